//! The MPI world (rsmpi over the system's MPI library): initialisation, the collectives
//! [`super::Dist`] exposes on `MPI_COMM_WORLD`, and the arrival check before each of them.
//!
//! Arrival check: before a collective, every rank sends each peer the collective's sequence
//! number, kind and element count on a communicator of its own and waits until it has every
//! peer's. A collective that hangs can then be blamed on the ranks that never arrived (the
//! watchdog's message names them), and ranks whose collectives got out of step or disagree on a
//! length (a caller bug that would otherwise deadlock or mix up data) are caught at once. It costs one round of tiny messages, N-1 per rank, against
//! buckets of megabytes; the collective itself stays MPI's own tuned blocking one.

use super::watchdog::Watchdog;
use super::DistError;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// MPI counts are C ints; larger buffers go in calls of at most this many elements.
const MAX_COUNT: usize = 1 << 30;

pub(super) struct MpiWorld {
    world: SimpleCommunicator,
    /// A duplicate of the world for arrival messages, which must never match anything else.
    arrivals: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// Finalises MPI when dropped; the last field, since fields drop in order and the
    /// communicators above must be freed before MPI is finalised.
    _universe: Universe,
}

impl MpiWorld {
    pub(super) fn init() -> Result<MpiWorld, DistError> {
        // Funneled: the main thread makes every MPI call; the watchdog thread only reads atomics
        // and exits the process.
        let (universe, _) =
            mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or(DistError::MpiInit)?;
        let world = universe.world();
        let arrivals = world.duplicate();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(MpiWorld { _universe: universe, world, arrivals, rank, size })
    }

    /// The arrival check (see the module docs) for the collective the watchdog was just armed
    /// for. While peers are missing the watchdog's detail names them, so that a timeout does.
    /// `op` is the collective's [`Op`], the same on every rank by contract.
    pub(super) fn arrive(&self, watchdog: &Watchdog, op: Op) {
        if self.size == 1 {
            return;
        }
        let mine = [watchdog.seq(), op.kind as u64, op.count as u64];
        let mut tokens = vec![0u64; 3 * self.size];
        mpi::request::scope(|scope| {
            let mut pending = Vec::with_capacity(self.size - 1);
            for (peer, slot) in tokens.chunks_mut(3).enumerate().filter(|(p, _)| *p != self.rank) {
                pending.push((
                    peer,
                    self.arrivals.process_at_rank(peer as i32).immediate_receive_into(scope, slot),
                ));
            }
            // Receives are posted before sends, so a peer holding our token has posted its receive
            // for ours: the sends below complete once all tokens are in.
            let sends: Vec<_> = (0..self.size)
                .filter(|p| *p != self.rank)
                .map(|peer| {
                    self.arrivals.process_at_rank(peer as i32).immediate_send(scope, &mine[..])
                })
                .collect();
            let start = std::time::Instant::now();
            let mut reported = usize::MAX;
            while !pending.is_empty() {
                if pending.len() != reported {
                    reported = pending.len();
                    let missing: Vec<usize> = pending.iter().map(|(p, _)| *p).collect();
                    watchdog.set_detail(not_arrived(&missing));
                }
                pending = pending
                    .into_iter()
                    .filter_map(|(peer, r)| r.test().err().map(|r| (peer, r)))
                    .collect();
                // Spin briefly for the usual near-simultaneous arrival, then leave the core to the
                // ranks being waited for (they may share it).
                if start.elapsed() < std::time::Duration::from_millis(10) {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
            for s in sends {
                s.wait();
            }
        });
        let differ: Vec<String> = tokens
            .chunks(3)
            .enumerate()
            .filter(|(p, t)| *p != self.rank && **t != mine)
            .map(|(p, t)| format!("rank {p} is at #{} {}", t[0], describe(t[1], t[2])))
            .collect();
        if !differ.is_empty() {
            eprintln!(
                "error: rank {}: at collective #{} {}, {}; the ranks called different collectives (a bug in motrain)",
                self.rank,
                mine[0],
                describe(mine[1], mine[2]),
                differ.join(", ")
            );
            self.world.abort(1);
        }
        watchdog.set_detail("every rank arrived, so a peer was lost during the transfer".into());
    }

    pub(super) fn rank(&self) -> usize {
        self.rank
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    pub(super) fn all_reduce_sum_f32(&self, data: &mut [f32]) {
        for chunk in data.chunks_mut(MAX_COUNT) {
            // rsmpi has no MPI_IN_PLACE; a copy of one chunk costs far less than the transfer.
            let send = chunk.to_vec();
            self.world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    pub(super) fn all_reduce_sum_f64(&self, data: &mut [f64]) {
        for chunk in data.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.world.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }

    pub(super) fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for chunk in bytes.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
    }

    pub(super) fn reduce_scatter_sum_f32(&self, input: &[f32]) -> Vec<f32> {
        let k = input.len() / self.size;
        assert!(
            k <= MAX_COUNT,
            "reduce_scatter of {k} elements per rank: more than one MPI call carries"
        );
        let mut out = vec![0f32; k];
        self.world.reduce_scatter_block_into(input, &mut out[..], SystemOperation::sum());
        out
    }

    pub(super) fn all_gather_f32(&self, shard: &[f32]) -> Vec<f32> {
        assert!(
            shard.len() <= MAX_COUNT,
            "all_gather of {} elements per rank: more than one MPI call carries",
            shard.len()
        );
        let mut out = vec![0f32; shard.len() * self.size];
        self.world.all_gather_into(shard, &mut out[..]);
        out
    }

    pub(super) fn any(&self, flag: bool) -> bool {
        let mut out = 0i32;
        self.world.all_reduce_into(&(flag as i32), &mut out, SystemOperation::max());
        out != 0
    }

    pub(super) fn barrier(&self) {
        self.world.barrier();
    }

    pub(super) fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// What a rank announces of a collective besides its sequence number.
#[derive(Clone, Copy)]
pub(super) struct Op {
    /// Index into [`super::COLLECTIVES`].
    pub kind: usize,
    /// Elements per rank; for a broadcast, the root (lengths may differ before it).
    pub count: usize,
}

fn describe(kind: u64, count: u64) -> String {
    match super::COLLECTIVES.get(kind as usize).copied() {
        Some(name @ ("barrier" | "all_agree")) => name.to_string(),
        Some(name @ "broadcast_bytes") => format!("{name} from rank {count}"),
        Some(name) => format!("{name} of {count} values"),
        None => format!("unknown collective {kind}"),
    }
}

/// The watchdog's detail while `missing` ranks have not arrived.
fn not_arrived(missing: &[usize]) -> String {
    match missing {
        [one] => format!("rank {one} has not reached it"),
        many => format!(
            "ranks {} have not reached it",
            many.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}
