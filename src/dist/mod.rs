//! The data-parallel world: which rank this process is among how many, and the collectives the
//! train loop needs (sums of gradients and statistics, reduce-scatter and all-gather for ZeRO-1,
//! broadcasts, agreement on stopping, barriers).
//!
//! [`Dist::from_env`] joins an MPI world only when a launcher started the process (`mpirun`,
//! `srun`; see [`detect_launcher`]) and the `mpi` feature is compiled in; otherwise it is the
//! single-process world, where every collective is the identity and nothing touches MPI, so
//! `motrain train` without a launcher behaves exactly as before.
//!
//! With the `nccl` feature, [`Dist::attach_device`] gives a multi-rank world on CUDA devices an
//! NCCL communicator (bootstrapped over MPI, see [`nccl`]), and the gradient sums then run on
//! the GPUs instead of through host copies and MPI.
//!
//! MPI collectives block forever when a peer dies or hangs. Every collective therefore runs under
//! a watchdog ([`watchdog`]): a thread that ends the process with exit code 1 and an `error:`
//! line when one collective has not completed within the collective timeout
//! (`MOTRAIN_COLLECTIVE_TIMEOUT_S`, default [`DEFAULT_TIMEOUT_S`]). See docs/distributed.md.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod watchdog;

use candle_core::{DType, Device, Tensor};
use std::time::Duration;
use watchdog::Watchdog;

/// Environment variable holding the collective timeout in seconds (0 disables the watchdog).
pub const TIMEOUT_ENV: &str = "MOTRAIN_COLLECTIVE_TIMEOUT_S";

/// The default collective timeout. Half of the 60 s within which every rank must be gone after
/// one is killed, leaving room for the poll interval and the launcher tearing the job down. It
/// bounds the wait inside one collective, i.e. how far one rank may lag behind the slowest
/// other; a step's own length does not count, since ranks start a step's collective together.
pub const DEFAULT_TIMEOUT_S: u64 = 30;

/// Gradients are averaged in buckets of about this many bytes (f32), as PyTorch DDP does: large
/// enough that per-call latency is amortised, small enough that the flattened copy stays cheap.
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("{var}={value}: not a number of seconds (0 turns the collective timeout off)")]
    BadTimeout { var: &'static str, value: String },
    #[error("launched as one of {size} ranks ({var} is set), but this motrain was built without the `mpi` feature; rebuild with `cargo build --release --features mpi`, or run it without mpirun/srun")]
    NoMpi { var: &'static str, size: usize },
    #[error("{var}={value}: not a number of ranks")]
    BadLauncherSize { var: &'static str, value: String },
    #[error("MPI could not be initialised (was it initialised already?)")]
    MpiInit,
    #[error("the launcher started {launched} ranks ({var}), but MPI sees a world of {mpi}: under srun, pass --mpi=pmix (or --mpi=pmi2) so that the ranks find each other")]
    WorldMismatch { var: &'static str, launched: usize, mpi: usize },
    #[error("{var}={value}: not a local rank (a number from 0)")]
    BadLocalRank { var: &'static str, value: String },
}

/// How the process was started, as far as its environment tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launcher {
    /// The variable that gave it away.
    pub var: &'static str,
    /// The world size the launcher announces, when the variable carries it.
    pub size: Option<usize>,
}

/// Variables a launcher sets in every rank's environment, with whether they hold the world size.
/// Open MPI's mpirun sets `OMPI_COMM_WORLD_SIZE`; MPICH/Hydra and `srun --mpi=pmi2` set
/// `PMI_SIZE`; `srun --mpi=pmix` sets `PMIX_RANK`. `SLURM_STEP_NUM_TASKS` rather than
/// `SLURM_NTASKS`: sbatch exports the latter to the batch script itself, where motrain run
/// without srun is one process, whereas the former exists only inside an srun job step.
const LAUNCHER_VARS: [(&str, bool); 4] = [
    ("OMPI_COMM_WORLD_SIZE", true),
    ("PMI_SIZE", true),
    ("SLURM_STEP_NUM_TASKS", true),
    ("PMIX_RANK", false),
];

/// The launcher that started this process, if any (see [`LAUNCHER_VARS`]).
pub fn detect_launcher() -> Result<Option<Launcher>, DistError> {
    detect_launcher_in(|k| std::env::var(k).ok())
}

fn detect_launcher_in(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launcher>, DistError> {
    for (var, holds_size) in LAUNCHER_VARS {
        let Some(value) = get(var) else { continue };
        let size = if holds_size {
            match value.trim().parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(DistError::BadLauncherSize { var, value }),
            }
        } else {
            None
        };
        return Ok(Some(Launcher { var, size }));
    }
    Ok(None)
}

/// Variables a launcher sets to this process's rank among the ranks on its node: Open MPI's
/// mpirun, MPICH/Hydra's mpiexec, Slurm's srun (and PMIx launchers), in that order.
const LOCAL_RANK_VARS: [&str; 4] =
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "PMIX_LOCAL_RANK"];

/// This process's rank among the ranks on its node, when a launcher started it and says so
/// (see [`LOCAL_RANK_VARS`]): the GPU it takes (`run.device = "cuda"`, see `crate::device`).
pub fn local_rank() -> Result<Option<usize>, DistError> {
    if detect_launcher()?.is_none() {
        return Ok(None);
    }
    local_rank_in(|k| std::env::var(k).ok())
}

fn local_rank_in(get: impl Fn(&str) -> Option<String>) -> Result<Option<usize>, DistError> {
    for var in LOCAL_RANK_VARS {
        let Some(value) = get(var) else { continue };
        return match value.trim().parse::<usize>() {
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(DistError::BadLocalRank { var, value }),
        };
    }
    Ok(None)
}

/// The collective timeout from [`TIMEOUT_ENV`]; None when it is 0 (no watchdog).
pub fn timeout_from_env() -> Result<Option<Duration>, DistError> {
    timeout_from(std::env::var(TIMEOUT_ENV).ok())
}

fn timeout_from(value: Option<String>) -> Result<Option<Duration>, DistError> {
    let Some(value) = value else { return Ok(Some(Duration::from_secs(DEFAULT_TIMEOUT_S))) };
    match value.trim().parse::<f64>() {
        Ok(0.0) => Ok(None),
        Ok(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(DistError::BadTimeout { var: TIMEOUT_ENV, value }),
    }
}

/// The collectives by name, as the watchdog and the arrival check report them; a name's index
/// travels in arrival messages, so ranks must agree on this list (they run one binary).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
const COLLECTIVES: [&str; 9] = [
    "all_reduce_sum(f32)",
    "all_reduce_sum(f64)",
    "broadcast_bytes",
    "reduce_scatter_sum",
    "all_gather",
    "all_agree",
    "barrier",
    "nccl_comm_init_rank",
    "all_reduce_sum(nccl)",
];

enum Backend {
    Single,
    #[cfg(feature = "mpi")]
    Mpi(mpi::MpiWorld),
}

/// This process's place in the data-parallel world and the collectives over it. Keep it alive
/// until the process ends: dropping an MPI world finalises MPI.
pub struct Dist {
    backend: Backend,
    watchdog: Watchdog,
    /// The GPU collectives, once [`Dist::attach_device`] has set them up.
    #[cfg(feature = "nccl")]
    nccl: std::cell::OnceCell<nccl::Nccl>,
}

impl Dist {
    /// The world of one process: collectives are the identity and no watchdog runs.
    pub fn single() -> Dist {
        Dist::new(Backend::Single, Watchdog::unwatched(0))
    }

    fn new(backend: Backend, watchdog: Watchdog) -> Dist {
        Dist {
            backend,
            watchdog,
            #[cfg(feature = "nccl")]
            nccl: std::cell::OnceCell::new(),
        }
    }

    /// The MPI world when a launcher started this process (and the `mpi` feature is compiled
    /// in), else [`Dist::single`]. A launcher announcing several ranks to a build without MPI is
    /// an error: the ranks would each train alone into the same run.
    pub fn from_env() -> Result<Dist, DistError> {
        let timeout = timeout_from_env()?;
        let Some(launcher) = detect_launcher()? else { return Ok(Dist::single()) };
        Dist::launched(launcher, timeout)
    }

    #[cfg(feature = "mpi")]
    fn launched(launcher: Launcher, timeout: Option<Duration>) -> Result<Dist, DistError> {
        let world = mpi::MpiWorld::init()?;
        // `srun --mpi=none` starts N processes that each initialise MPI as a world of one; they
        // would train alone into the same run.
        if let Some(launched) = launcher.size.filter(|&n| n != world.size()) {
            return Err(DistError::WorldMismatch {
                var: launcher.var,
                launched,
                mpi: world.size(),
            });
        }
        let watchdog = Watchdog::new(world.rank(), timeout);
        Ok(Dist::new(Backend::Mpi(world), watchdog))
    }

    #[cfg(not(feature = "mpi"))]
    fn launched(launcher: Launcher, _timeout: Option<Duration>) -> Result<Dist, DistError> {
        match launcher.size {
            Some(size) if size > 1 => Err(DistError::NoMpi { var: launcher.var, size }),
            _ => Ok(Dist::single()),
        }
    }

    pub fn rank(&self) -> usize {
        match &self.backend {
            Backend::Single => 0,
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.rank(),
        }
    }

    pub fn size(&self) -> usize {
        match &self.backend {
            Backend::Single => 1,
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.size(),
        }
    }

    /// Rank 0: the one that logs, evaluates and writes checkpoints.
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The timeout the watchdog applies to each collective (None: no watchdog).
    pub fn collective_timeout(&self) -> Option<Duration> {
        self.watchdog.timeout()
    }

    /// Changes the collective timeout, e.g. raised around a barrier where the other ranks wait
    /// for rank 0 to write a checkpoint, which may take longer than a collective should.
    pub fn set_collective_timeout(&self, timeout: Option<Duration>) {
        self.watchdog.set_timeout(timeout)
    }

    /// Prepares the collectives for tensors on `dev`; every rank calls it, with its own device.
    /// With the `nccl` feature, a CUDA device and more than one rank, this creates the NCCL
    /// communicator over the ranks' GPUs (a collective itself), and from then on
    /// [`Dist::all_reduce_sum_tensors`] and [`Dist::all_reduce_mean_tensors`] sum tensors on that
    /// device with NCCL. Otherwise (CPU, one rank, or no `nccl`) it does nothing and tensors go
    /// through the host and MPI.
    #[cfg_attr(not(feature = "nccl"), allow(unused_variables))]
    pub fn attach_device(&self, dev: &Device) -> candle_core::Result<()> {
        #[cfg(feature = "nccl")]
        if let (Device::Cuda(cuda), Backend::Mpi(w)) = (dev, &self.backend) {
            if self.size() > 1 && self.nccl.get().is_none() {
                let comm = nccl::Nccl::init(self, w, cuda)?;
                // Cannot be set already: checked just above, and Dist is not shared by threads.
                let _ = self.nccl.set(comm);
            }
        }
        Ok(())
    }

    /// Whether gradients on `dev` are summed with NCCL on the GPUs (see [`Dist::attach_device`]).
    #[cfg_attr(not(feature = "nccl"), allow(unused_variables))]
    pub fn gpu_collectives(&self, dev: &Device) -> bool {
        #[cfg(feature = "nccl")]
        if let Some(n) = self.nccl.get() {
            return n.serves(dev);
        }
        false
    }

    /// Arms the watchdog for collective `name` (one of [`COLLECTIVES`]) over `count` elements per
    /// rank (a broadcast: its root) and waits for every peer to reach the same.
    #[cfg(feature = "mpi")]
    fn enter(&self, w: &mpi::MpiWorld, name: &'static str, count: usize) -> watchdog::Guard<'_> {
        let guard = self.watchdog.enter(name);
        let kind = COLLECTIVES.iter().position(|c| *c == name).expect("a listed collective");
        w.arrive(&self.watchdog, mpi::Op { kind, count });
        guard
    }

    /// Element-wise sum over all ranks, in place.
    // In the one-process world the data stay as they are.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_sum_in_place(&self, data: &mut [f32]) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "all_reduce_sum(f32)", data.len());
                w.all_reduce_sum_f32(data);
            }
        }
    }

    /// Element-wise sum over all ranks, in place; f64 for statistics (token counts, loss sums)
    /// whose sums must not lose precision.
    // In the one-process world the data stay as they are.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_sum_in_place_f64(&self, data: &mut [f64]) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "all_reduce_sum(f64)", data.len());
                w.all_reduce_sum_f64(data);
            }
        }
    }

    /// Replaces `bytes` on every rank by `root`'s (whose length the others need not know).
    // In the one-process world the bytes stay as they are; only MPI resizes the Vec.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables, clippy::ptr_arg))]
    pub fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) {
        assert!(root < self.size(), "broadcast from rank {root} in a world of {}", self.size());
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "broadcast_bytes", root);
                w.broadcast_bytes(root, bytes);
            }
        }
    }

    /// Whether `bytes` (e.g. a hash of the resolved config) are the same on every rank.
    pub fn same_on_all_ranks(&self, bytes: &[u8]) -> bool {
        let mut root = bytes.to_vec();
        self.broadcast_bytes(0, &mut root);
        !self.all_agree(root != bytes)
    }

    /// ZeRO-1's gradient step: the element-wise sum over ranks of `input`, of which this rank
    /// receives its shard, `input[rank*k .. (rank+1)*k]` summed, where `k = input.len() / size`.
    /// `input.len()` must be a multiple of the world size: pad the flat vector with zeros to
    /// [`padded_len`] (see [`shard_range`] for which elements a rank owns).
    pub fn reduce_scatter_sum(&self, input: &[f32]) -> Vec<f32> {
        let size = self.size();
        assert!(
            input.len().is_multiple_of(size),
            "reduce_scatter of {} elements over {size} ranks: pad to a multiple of the world size",
            input.len()
        );
        match &self.backend {
            Backend::Single => input.to_vec(),
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "reduce_scatter_sum", input.len());
                w.reduce_scatter_sum_f32(input)
            }
        }
    }

    /// ZeRO-1's parameter step: every rank's equal-length `shard`, concatenated in rank order.
    pub fn all_gather(&self, shard: &[f32]) -> Vec<f32> {
        match &self.backend {
            Backend::Single => shard.to_vec(),
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "all_gather", shard.len());
                w.all_gather_f32(shard)
            }
        }
    }

    /// True on every rank when `flag` is true on any (logical OR): a stop signal that reached one
    /// rank stops all of them at the same step.
    pub fn all_agree(&self, flag: bool) -> bool {
        match &self.backend {
            Backend::Single => flag,
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "all_agree", 1);
                w.any(flag)
            }
        }
    }

    pub fn barrier(&self) {
        match &self.backend {
            Backend::Single => {}
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => {
                let _g = self.enter(w, "barrier", 0);
                w.barrier();
            }
        }
    }

    /// Ends the whole job at once with `code`: for an error on one rank that the others cannot
    /// learn about through a collective (they would otherwise wait for the watchdog).
    pub fn abort(&self, code: i32) -> ! {
        match &self.backend {
            Backend::Single => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Backend::Mpi(w) => w.abort(code),
        }
    }

    /// Averages gradients over ranks (sum, then divide by the world size), in buckets of about
    /// [`BUCKET_BYTES`]; returns tensors of the same shapes, dtypes and devices, in order.
    pub fn all_reduce_mean_tensors(&self, grads: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        self.all_reduce_mean_tensors_bucketed(grads, BUCKET_BYTES / std::mem::size_of::<f32>())
    }

    /// Sums gradients over ranks in buckets of about [`BUCKET_BYTES`]: for gradients each rank
    /// has already scaled to its share of the global batch.
    pub fn all_reduce_sum_tensors(&self, grads: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
        self.all_reduce_tensors(grads, BUCKET_BYTES / std::mem::size_of::<f32>(), 1.0)
    }

    /// [`Dist::all_reduce_mean_tensors`] with buckets of `bucket_elems` f32 values. A tensor larger
    /// than a bucket forms a bucket of its own, reduced in bucket-sized calls (which also keeps
    /// each MPI count within i32).
    pub fn all_reduce_mean_tensors_bucketed(
        &self, grads: &[Tensor], bucket_elems: usize,
    ) -> candle_core::Result<Vec<Tensor>> {
        self.all_reduce_tensors(grads, bucket_elems, 1.0 / self.size() as f32)
    }

    /// The sum over ranks of `grads`, times `scale`, in buckets of `bucket_elems` values.
    fn all_reduce_tensors(
        &self, grads: &[Tensor], bucket_elems: usize, scale: f32,
    ) -> candle_core::Result<Vec<Tensor>> {
        if self.size() == 1 {
            return Ok(grads.to_vec());
        }
        let bucket_elems = bucket_elems.max(1);
        #[cfg(feature = "nccl")]
        if let Some(n) = self.nccl.get() {
            if grads.iter().all(|g| n.serves(g.device())) {
                return self.all_reduce_tensors_nccl(n, grads, bucket_elems, scale);
            }
        }
        let counts: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
        let mut out = Vec::with_capacity(grads.len());
        for bucket in bucket_ranges(&counts, bucket_elems) {
            let mut flat = Vec::with_capacity(counts[bucket.clone()].iter().sum());
            for g in &grads[bucket.clone()] {
                flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            for chunk in flat.chunks_mut(bucket_elems) {
                self.all_reduce_sum_in_place(chunk);
            }
            if scale != 1.0 {
                flat.iter_mut().for_each(|x| *x *= scale);
            }
            let mut offset = 0;
            for g in &grads[bucket] {
                let n = g.elem_count();
                out.push(
                    Tensor::from_slice(&flat[offset..offset + n], g.shape(), g.device())?
                        .to_dtype(g.dtype())?,
                );
                offset += n;
            }
        }
        Ok(out)
    }
}

/// Consecutive runs of tensors (given their element counts) whose total stays within
/// `bucket_elems`; a tensor larger than that is a run of its own. Every rank computes the same
/// runs from the same shapes, which is what keeps their collectives matched.
fn bucket_ranges(counts: &[usize], bucket_elems: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < counts.len() {
        let (mut end, mut elems) = (start + 1, counts[start]);
        while end < counts.len() && elems + counts[end] <= bucket_elems {
            elems += counts[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The length of each rank's shard of `total` elements: `total / size` rounded up.
pub fn shard_len(total: usize, size: usize) -> usize {
    total.div_ceil(size)
}

/// `total` rounded up to a multiple of `size`: the length a flat vector is zero-padded to before
/// [`Dist::reduce_scatter_sum`]; [`Dist::all_gather`] returns this length and the caller drops
/// the padding at the end.
pub fn padded_len(total: usize, size: usize) -> usize {
    shard_len(total, size) * size
}

/// The elements of a flat vector of `total` that `rank` owns under ZeRO-1: its shard of the
/// padded vector, cut at `total` (the last ranks own fewer real elements, or none, when
/// `total` is not a multiple of the world size).
pub fn shard_range(total: usize, size: usize, rank: usize) -> std::ops::Range<usize> {
    let k = shard_len(total, size);
    (rank * k).min(total)..((rank + 1) * k).min(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn launchers_are_recognised_by_their_variables() {
        assert_eq!(detect_launcher_in(env(&[])).unwrap(), None);
        assert_eq!(
            detect_launcher_in(env(&[("SLURM_NTASKS", "4")])).unwrap(),
            None,
            "sbatch's own environment is not a launch"
        );
        let ompi = detect_launcher_in(env(&[("OMPI_COMM_WORLD_SIZE", "2")])).unwrap();
        assert_eq!(ompi, Some(Launcher { var: "OMPI_COMM_WORLD_SIZE", size: Some(2) }));
        let srun = detect_launcher_in(env(&[("SLURM_NTASKS", "8"), ("SLURM_STEP_NUM_TASKS", "4")]))
            .unwrap();
        assert_eq!(srun, Some(Launcher { var: "SLURM_STEP_NUM_TASKS", size: Some(4) }));
        let pmix = detect_launcher_in(env(&[("PMIX_RANK", "0")])).unwrap();
        assert_eq!(pmix, Some(Launcher { var: "PMIX_RANK", size: None }));
        for bad in ["", "two", "0", "-1"] {
            let e = detect_launcher_in(env(&[("PMI_SIZE", bad)])).unwrap_err();
            assert!(e.to_string().contains("PMI_SIZE"), "{e}");
        }
    }

    #[test]
    fn the_local_rank_comes_from_the_launcher() {
        assert_eq!(local_rank_in(env(&[])).unwrap(), None);
        assert_eq!(local_rank_in(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])).unwrap(), Some(3));
        assert_eq!(local_rank_in(env(&[("MPI_LOCALRANKID", "1")])).unwrap(), Some(1));
        assert_eq!(local_rank_in(env(&[("SLURM_LOCALID", "0")])).unwrap(), Some(0));
        assert_eq!(
            local_rank_in(env(&[("SLURM_LOCALID", "5"), ("OMPI_COMM_WORLD_LOCAL_RANK", "2")]))
                .unwrap(),
            Some(2),
            "mpirun inside a Slurm allocation: mpirun's own numbering"
        );
        for bad in ["", "x", "-1"] {
            let e = local_rank_in(env(&[("SLURM_LOCALID", bad)])).unwrap_err();
            assert!(e.to_string().contains("SLURM_LOCALID"), "{e}");
        }
    }

    #[test]
    fn the_timeout_comes_from_the_environment() {
        assert_eq!(timeout_from(None).unwrap(), Some(Duration::from_secs(DEFAULT_TIMEOUT_S)));
        assert_eq!(timeout_from(Some("0".into())).unwrap(), None);
        assert_eq!(timeout_from(Some("2.5".into())).unwrap(), Some(Duration::from_millis(2500)));
        for bad in ["", "-3", "soon", "inf", "NaN"] {
            let e = timeout_from(Some(bad.into())).unwrap_err();
            assert!(e.to_string().contains(TIMEOUT_ENV), "{e}");
        }
    }

    #[test]
    fn shards_cover_the_vector_once() {
        for total in [0, 1, 5, 6, 7, 100] {
            for size in 1..5 {
                assert_eq!(padded_len(total, size) % size, 0);
                assert!(padded_len(total, size) - total < size);
                let mut covered = 0;
                for rank in 0..size {
                    let r = shard_range(total, size, rank);
                    assert_eq!(
                        r.start,
                        covered.min(total),
                        "total {total} size {size} rank {rank}"
                    );
                    covered = r.end;
                }
                assert_eq!(covered, total);
            }
        }
    }

    #[test]
    fn buckets_fill_up_to_the_limit_and_oversized_tensors_go_alone() {
        assert!(bucket_ranges(&[], 10).is_empty());
        assert_eq!(bucket_ranges(&[3, 3, 3, 3], 10), vec![0..3, 3..4]);
        assert_eq!(bucket_ranges(&[3, 30, 3, 7, 1], 10), vec![0..1, 1..2, 2..4, 4..5]);
        assert_eq!(bucket_ranges(&[0, 10, 0], 10), vec![0..3]);
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn a_launch_as_several_ranks_needs_the_mpi_feature() {
        let several = Launcher { var: "OMPI_COMM_WORLD_SIZE", size: Some(2) };
        let Err(e) = Dist::launched(several, None) else {
            panic!("two ranks without MPI were accepted")
        };
        assert!(e.to_string().contains("--features mpi"), "{e}");
        let one = Launcher { var: "OMPI_COMM_WORLD_SIZE", size: Some(1) };
        assert_eq!(Dist::launched(one, None).unwrap().size(), 1);
        let unknown = Launcher { var: "PMIX_RANK", size: None };
        assert_eq!(Dist::launched(unknown, None).unwrap().size(), 1);
    }

    #[test]
    fn one_rank_collectives_are_the_identity() {
        let d = Dist::single();
        assert_eq!((d.rank(), d.size(), d.is_root()), (0, 1, true));
        let mut v = vec![1.0f32, -2.0, 3.5];
        d.all_reduce_sum_in_place(&mut v);
        assert_eq!(v, [1.0, -2.0, 3.5]);
        let mut w = vec![1e300f64, 2.0];
        d.all_reduce_sum_in_place_f64(&mut w);
        assert_eq!(w, [1e300, 2.0]);
        assert_eq!(d.reduce_scatter_sum(&v), v);
        assert_eq!(d.all_gather(&v), v);
        let mut b = b"hash".to_vec();
        d.broadcast_bytes(0, &mut b);
        assert_eq!(b, b"hash");
        assert!(d.same_on_all_ranks(b"x"));
        assert!(d.all_agree(true));
        assert!(!d.all_agree(false));
        d.barrier();
        assert_eq!(d.collective_timeout(), None);
    }

    #[test]
    fn one_rank_gradient_averaging_keeps_values_shapes_and_dtypes() {
        let dev = Device::Cpu;
        let grads = vec![
            Tensor::arange(0f32, 6.0, &dev).unwrap().reshape((2, 3)).unwrap(),
            Tensor::new(&[[1.5f32]], &dev).unwrap().to_dtype(DType::BF16).unwrap(),
        ];
        let out = Dist::single().all_reduce_mean_tensors_bucketed(&grads, 4).unwrap();
        assert_eq!(out.len(), 2);
        for (a, b) in grads.iter().zip(&out) {
            assert_eq!((a.dims(), a.dtype()), (b.dims(), b.dtype()));
            let (a, b) = (
                a.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
                b.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            );
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
    }
}
