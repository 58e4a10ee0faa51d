use clap::Parser;

fn main() {
    // User input must never surface as a panic with a backtrace; if a bug does panic, say so
    // in one `error:` line.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at =
            info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{at}: {msg} (please report this)");
        std::process::exit(1);
    }));
    // `motrain … | head` ends like any Unix tool when the reader goes away, instead of failing
    // on the next print.
    // SAFETY: at start-up, before any thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // candle's element-wise ops otherwise start a spinning thread pool of their own next to
    // the rayon pool that runs matmuls and our kernels; on few cores they fight over them.
    // With one thread, the vendored candle shares their work out on rayon's pool instead
    // (vendor/README.md).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let cli = motrain::cli::Cli::parse();
    // candle's matmuls run on its own rayon pool; running everything there too keeps our fused
    // kernels from competing with it for the same cores.
    let result = candle_core::utils::with_threadpool(|| motrain::cli::run(cli));
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            motrain::cli::exit_code(&e)
        }
    };
    std::process::exit(code);
}
