//! `prepare`'s progress: an indicatif bar on bytes read with MB/s, documents/s, tokens/s and ETA
//! when stderr is a terminal, else a plain line every 10 seconds.

use std::io::IsTerminal;
use std::time::Instant;

/// An indicatif bar on stderr when it is a terminal, else a plain line every 10 seconds.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    start: Instant,
    last: Instant,
    total: u64,
}

impl Progress {
    pub fn new(enabled: bool, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (enabled && tty).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let now = Instant::now();
        Progress { bar, plain: enabled && !tty, start: now, last: now, total }
    }

    fn rates(&self, docs: u64, tokens: u64) -> String {
        let s = self.start.elapsed().as_secs_f64().max(1e-9);
        format!("{:.0} docs/s {:.2}M tokens/s", docs as f64 / s, tokens as f64 / s / 1e6)
    }

    pub fn update(&mut self, bytes: u64, docs: u64, tokens: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(bytes);
            if self.last.elapsed().as_millis() >= 200 {
                bar.set_message(self.rates(docs, tokens));
                self.last = Instant::now();
            }
        } else if self.plain && self.last.elapsed().as_secs() >= 10 {
            let s = self.start.elapsed().as_secs_f64();
            let mb_s = bytes as f64 / s / 1e6;
            let eta = if bytes > 0 {
                (self.total.saturating_sub(bytes)) as f64 * s / bytes as f64
            } else {
                0.0
            };
            eprintln!(
                "prepare: {:.1}/{:.1} MB ({:.1} MB/s) {docs} docs {tokens} tokens, {}, ETA {eta:.0} s",
                bytes as f64 / 1e6,
                self.total as f64 / 1e6,
                mb_s,
                self.rates(docs, tokens)
            );
            self.last = Instant::now();
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
