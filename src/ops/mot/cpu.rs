//! The CPU kernels of the mixing ops. Work is split into tasks of (group row-block k, block of
//! positions), so a task reads its G input rows once while they sit in L1 and writes rows no
//! other task touches.

use super::*;
use crate::ops::vec::exp;

/// Merge's backward through the softmax and the controller.
pub(super) mod mixing;
/// The AVX-512 inner loops, with intrinsics.
#[cfg(target_arch = "x86_64")]
mod x86;

/// Positions per task: enough tasks to keep every thread busy, whatever K is.
fn positions_per_task(k: usize, s: usize) -> usize {
    let blocks = (4 * rayon::current_num_threads()).div_ceil(k.max(1)).max(1);
    s.div_ceil(blocks).max(1)
}

/// Splits `buf`, seen as `[outer, S, width]`, into the pieces each task writes: task
/// `(k, p)` gets, for every outer index `o` with `owner(o) == k` (in order of `o`), rows
/// `[p·sb, (p+1)·sb)` of that `[S, width]` slab.
fn split(
    buf: &mut [f32], s: usize, width: usize, sb: usize, k: usize, owner: impl Fn(usize) -> usize,
) -> Vec<Vec<&mut [f32]>> {
    let per_k = s.div_ceil(sb);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..k * per_k).map(|_| Vec::new()).collect();
    if width == 0 || s == 0 {
        return tasks;
    }
    for (o, slab) in buf.chunks_mut(s * width).enumerate() {
        for (p, piece) in slab.chunks_mut(sb * width).enumerate() {
            tasks[owner(o) * per_k + p].push(piece);
        }
    }
    tasks
}

/// Which group row-block each `[S, width]` slab of an output belongs to.
#[derive(Clone, Copy)]
enum Slabs {
    /// `[B, S, width]`: slab o is batch row o, in block o / G.
    Rows,
    /// `[E·K, S, width]`: slab o holds expert o / K's merged tokens of block o % K.
    Experts,
    /// `[tasks, width]`: one row per task, in task order (a task's partial sum).
    Tasks,
}

/// A task's share of the work: group row-block `kk` at positions `s0..s0 + positions`, on
/// the SIMD path `level` (read once per task, not once per position).
#[derive(Clone, Copy)]
struct Task {
    kk: usize,
    s0: usize,
    positions: usize,
    level: simd::Level,
}

/// One output of the tasks: `len` floats seen as `[S, width]` slabs, owned as `slabs` says.
#[derive(Clone, Copy)]
struct Output {
    len: usize,
    width: usize,
    slabs: Slabs,
}

/// A fresh output of `len` floats, seen as `[S, width]` slabs (`slabs`), filled by `body` one
/// task at a time on the pool, each task on the SIMD path in use: `body(task, pieces)` gets the
/// task's pieces of the output, one per slab of its block, in order, `positions` rows each.
///
/// # Safety
/// `body` must write every element of every piece it is given (the output starts
/// uninitialised), and `body` should be `#[inline(always)]` so that it is compiled for the
/// SIMD path.
unsafe fn run_tasks(
    len: usize, (b, s, width, g): (usize, usize, usize, usize), slabs: Slabs,
    body: impl Fn(Task, &mut [&mut [f32]]) + Sync,
) -> Vec<f32> {
    let none = Output { len: 0, width: 0, slabs: Slabs::Rows };
    // SAFETY: as the caller guarantees; the second output is empty.
    unsafe {
        run_tasks2(
            [Output { len, width, slabs }, none],
            (b, s, g),
            positions_per_task(b / g, s),
            #[inline(always)]
            |t: Task, pieces: &mut [&mut [f32]], _: &mut [&mut [f32]]| body(t, pieces),
        )
    }
}

/// [`run_tasks`] with two outputs, one after the other in the vector it returns, over tasks of
/// `sb` positions: `body(task, first, second)` gets the task's pieces of both, which the same
/// tasks own (the same group row-block and positions).
///
/// # Safety
/// As [`run_tasks`], for the pieces of both outputs.
unsafe fn run_tasks2(
    outputs: [Output; 2], (b, s, g): (usize, usize, usize), sb: usize,
    body: impl Fn(Task, &mut [&mut [f32]], &mut [&mut [f32]]) + Sync,
) -> Vec<f32> {
    let k = b / g;
    fn pieces(
        buf: &mut [f32], o: Output, s: usize, sb: usize, k: usize, g: usize,
    ) -> Vec<Vec<&mut [f32]>> {
        match o.slabs {
            Slabs::Rows => split(buf, s, o.width, sb, k, |i| i / g),
            Slabs::Experts => split(buf, s, o.width, sb, k, |i| i % k),
            Slabs::Tasks => {
                let mut rest = buf;
                (0..k * s.div_ceil(sb))
                    .map(|_| {
                        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(o.width);
                        rest = tail;
                        vec![piece]
                    })
                    .collect()
            }
        }
    }
    let [first, second] = outputs;
    let fill = |out: &mut [f32]| {
        let (a, b) = out.split_at_mut(first.len);
        let (a, b) = (pieces(a, first, s, sb, k, g), pieces(b, second, s, sb, k, g));
        a.into_par_iter().zip(b).enumerate().for_each(|(t, (mut a, mut b))| {
            let (kk, s0) = (t / s.div_ceil(sb), (t % s.div_ceil(sb)) * sb);
            let positions = a.first().map_or(0, |p| p.len() / first.width.max(1));
            let level = simd::level();
            simd::run(
                #[inline(always)]
                || body(Task { kk, s0, positions, level }, &mut a, &mut b),
            );
            // The backward passes stream their results (`store_block`).
            stream_fence();
        })
    };
    // SAFETY: the tasks' pieces cover both outputs, and `body` writes all of each (the
    // caller's contract).
    unsafe { fresh(first.len + second.len, fill) }
}

/// `acc + a·x`, as one fused multiply-add where the path has one ([`simd::Level::fma`]): one
/// rounding and half the arithmetic instructions of a multiply and an add, which were most of
/// the mixing kernels' inner loops (`docs/performance-log.md`, twenty-third session).
/// Baseline x86-64 has no FMA (`mul_add` would be a libm call), so the portable path there
/// multiplies, then adds.
#[inline(always)]
fn madd<const FMA: bool>(acc: f32, a: f32, x: f32) -> f32 {
    if FMA {
        a.mul_add(x, acc)
    } else {
        acc + a * x
    }
}

/// `dst += a · src`, a loop the compiler vectorises.
#[inline(always)]
fn axpy<const FMA: bool>(dst: &mut [f32], a: f32, src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = madd::<FMA>(*d, a, x);
    }
}

/// Where the coefficients of a weighted sum sit: term `i`'s coefficient for output `r` at
/// `data[i·term + r·out]` (for MoT, straight in the `[B, S, E]` mixing weights).
#[derive(Clone, Copy)]
struct Coefs<'a> {
    data: &'a [f32],
    term: usize,
    out: usize,
}

impl Coefs<'_> {
    #[inline(always)]
    fn at(&self, i: usize, r: usize) -> f32 {
        self.data[i * self.term + r * self.out]
    }
}

/// `outs[r][at..at + len] = Σ_{i < n} c.at(i, r) · row(i)` for every output `r`: each block
/// of the outputs is summed in registers over all the terms and stored once, where adding
/// each term into its output (`axpy`) would load and store it once per term, and a tile of
/// several outputs loads each block of `row(i)` once for all of them. The multiply-adds are
/// those of `axpy` from zero, in the same order, so the bits are too. Tiles of 4 outputs × 64
/// floats (16 AVX-512 registers); 1 × 64 on AVX2 and 1 × 32 on the portable path, whose 16
/// registers more would spill. `level` is the SIMD path the caller runs on; `store` is
/// [`Store::Set`] or [`Store::Stream`] (see [`store_block`]).
#[inline(always)]
fn weighted_sums<'a>(
    level: simd::Level, outs: &mut [&mut [f32]], span: (usize, usize), store: Store, n: usize,
    c: Coefs, row: impl Fn(usize) -> &'a [f32],
) {
    let o = (outs, span, store);
    match level {
        simd::Level::Portable if level.fma() => tiles::<1, 32, true, _>(level, o, n, c, row),
        simd::Level::Portable => tiles::<1, 32, false, _>(level, o, n, c, row),
        simd::Level::Avx2 => tiles::<1, 64, true, _>(level, o, n, c, row),
        _ => tiles::<4, 64, true, _>(level, o, n, c, row),
    }
}

/// A block of the weighted sums into its output: plainly, or by streaming stores
/// ([`stream_copy`]), which send a line to memory without reading it in first. The backward
/// passes stream their `[B, S, d]` and `[E, N, d]` results: those lines are rarely still
/// cached, and a plain store to one waits on reading it in (steps alternated in one process:
/// bench-mot's bf16 step 10 ms faster). The forward's results, which the next op reads at
/// once, measured better stored plainly.
#[inline(always)]
fn store_block(out: &mut [f32], block: &[f32], store: Store) {
    match store {
        Store::Set => out.copy_from_slice(block),
        Store::Stream => stream_copy(out, block),
        Store::Add => unreachable!("the weighted sums overwrite their outputs"),
    }
}

/// [`weighted_sums`] in tiles of `R` outputs, the last outputs one at a time; on AVX-512 the
/// tiles of 4 by [`x86::four_sums`].
#[inline(always)]
fn tiles<'a, const R: usize, const LANES: usize, const FMA: bool, X: Fn(usize) -> &'a [f32]>(
    level: simd::Level, (outs, span, store): (&mut [&mut [f32]], (usize, usize), Store), n: usize,
    c: Coefs, row: X,
) {
    let whole = outs.len() / R * R;
    let (tiled, rest) = outs.split_at_mut(whole);
    for (t, tile) in tiled.chunks_exact_mut(R).enumerate() {
        let c = Coefs { data: &c.data[t * R * c.out..], ..c };
        #[cfg(target_arch = "x86_64")]
        if R == 4 && level == simd::Level::Avx512 {
            // SAFETY: code on the AVX-512 path runs only on a CPU that has it (and FMA).
            unsafe { x86::four_sums((tile, span, store), n, c, &row) };
            continue;
        }
        let _ = level;
        sum_in_blocks::<R, LANES, FMA, X>((tile, span, store), n, c, &row);
    }
    for (r, out) in rest.iter_mut().enumerate() {
        let c = Coefs { data: &c.data[(whole + r) * c.out..], ..c };
        let one = std::slice::from_mut(out);
        sum_in_blocks::<1, LANES, FMA, X>((one, span, store), n, c, &row);
    }
}

/// One tile of `R` outputs.
#[inline(always)]
fn sum_in_blocks<
    'a,
    const R: usize,
    const LANES: usize,
    const FMA: bool,
    X: Fn(usize) -> &'a [f32],
>(
    (outs, (at, len), store): (&mut [&mut [f32]], (usize, usize), Store), n: usize, c: Coefs,
    row: &X,
) {
    let whole = len / LANES * LANES;
    for b in (0..whole).step_by(LANES) {
        let mut acc = [[0f32; LANES]; R];
        for i in 0..n {
            let x: &[f32; LANES] = row(i)[b..b + LANES].try_into().unwrap();
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = c.at(i, r);
                for (s, &x) in acc.iter_mut().zip(x) {
                    *s = madd::<FMA>(*s, a, x);
                }
            }
        }
        for (out, acc) in outs.iter_mut().zip(&acc) {
            store_block(&mut out[at + b..at + b + LANES], acc, store);
        }
    }
    for (r, out) in outs.iter_mut().enumerate() {
        let tail = &mut out[at + whole..at + len];
        tail.fill(0.0);
        for i in 0..n {
            axpy::<FMA>(tail, c.at(i, r), &row(i)[whole..len]);
        }
    }
}

/// Copies `n` rows of `d` floats, row `i` from `src(i)`, into `buf` one after another: the
/// rows a position mixes lie a power of two apart (a whole `[S, d]` slab), where they
/// would share a handful of cache sets.
#[inline(always)]
fn gather<'a>(buf: &mut [f32], n: usize, d: usize, src: impl Fn(usize) -> &'a [f32]) {
    for (i, row) in buf.chunks_exact_mut(d.max(1)).take(n).enumerate() {
        row.copy_from_slice(src(i));
    }
}

/// `out[j] = ⟨a, c_j⟩` for the rows `c_j` of `c` (`d` floats each), on the SIMD path `level`,
/// four rows at a time so that each block of `a` is loaded once for all four (the last rows
/// in a four padded with copies of the last, so that every row sums the same way). Each dot
/// sums 16 lanes with the multiply-adds of [`madd`], then its lanes ([`lane_sums`]), then the
/// tail.
#[inline(always)]
fn dots(level: simd::Level, a: &[f32], c: &[f32], d: usize, out: &mut [f32]) {
    if level.fma() {
        dots_with::<true>(level, a, c, d, out)
    } else {
        dots_with::<false>(level, a, c, d, out)
    }
}

/// `out[i][at..at + n] = dots(a(i), c)` for the `m` rows `a(i)`, `n` the rows of `c`: on
/// AVX-512 four rows of `a` at a time ([`x86::dots_four`]), the same bits as one by one.
#[inline(always)]
fn dots_rows<'a>(
    level: simd::Level, (m, a): (usize, impl Fn(usize) -> &'a [f32]), c: &[f32],
    (d, n): (usize, usize), out: &mut [&mut [f32]], at: usize,
) {
    // The rows of `a` that go four at a time.
    let fours = match level {
        simd::Level::Avx512 if cfg!(target_arch = "x86_64") => m / 4 * 4,
        _ => 0,
    };
    #[cfg(target_arch = "x86_64")]
    for i in (0..fours).step_by(4) {
        // SAFETY: code on the AVX-512 path runs only on a CPU that has it (and FMA).
        unsafe {
            x86::dots_four([a(i), a(i + 1), a(i + 2), a(i + 3)], c, (d, n), &mut out[i..], at)
        };
    }
    for (i, out) in out.iter_mut().enumerate().take(m).skip(fours) {
        dots(level, a(i), c, d, &mut out[at..at + n]);
    }
}

#[inline(always)]
fn dots_with<const FMA: bool>(level: simd::Level, a: &[f32], c: &[f32], d: usize, out: &mut [f32]) {
    const L: usize = 16;
    let whole = d / L * L;
    let n = out.len();
    for j0 in (0..n).step_by(4) {
        let row = |j: usize| {
            let j = (j0 + j).min(n - 1);
            &c[j * d..(j + 1) * d]
        };
        let rows = [row(0), row(1), row(2), row(3)];
        // Four named accumulators, not an array of them: LLVM keeps these in registers on
        // every path, where an array was stored back on every step on AVX2 (6x slower).
        let (mut s0, mut s1, mut s2, mut s3) = ([0f32; L], [0f32; L], [0f32; L], [0f32; L]);
        for b in (0..whole).step_by(L) {
            let x: &[f32; L] = a[b..b + L].try_into().unwrap();
            let y0: &[f32; L] = rows[0][b..b + L].try_into().unwrap();
            let y1: &[f32; L] = rows[1][b..b + L].try_into().unwrap();
            let y2: &[f32; L] = rows[2][b..b + L].try_into().unwrap();
            let y3: &[f32; L] = rows[3][b..b + L].try_into().unwrap();
            for l in 0..L {
                s0[l] = madd::<FMA>(s0[l], x[l], y0[l]);
                s1[l] = madd::<FMA>(s1[l], x[l], y1[l]);
                s2[l] = madd::<FMA>(s2[l], x[l], y2[l]);
                s3[l] = madd::<FMA>(s3[l], x[l], y3[l]);
            }
        }
        let sums = lane_sums(level, &[s0, s1, s2, s3]);
        for (j, o) in out[j0..].iter_mut().take(4).enumerate() {
            let mut t = sums[j];
            for (&x, &y) in a[whole..].iter().zip(&rows[j][whole..]) {
                t = madd::<FMA>(t, x, y);
            }
            *o = t;
        }
    }
}

/// The sum of the 16 lanes of each of four accumulators. On AVX-512, a transposing tree: four
/// outputs take 8 shuffles and 5 additions, where summing each one's lanes in order took 15
/// dependent additions and as many extractions each (`mot_bench`: `group_dot` 0.92–1.06 →
/// 0.77–0.83 ms a layer, each one-pass backward 1.5–1.6 → 1.3–1.4).
#[inline(always)]
fn lane_sums(level: simd::Level, acc: &[[f32; 16]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if level == simd::Level::Avx512 {
        // SAFETY: code on the AVX-512 path runs only on a CPU that has it.
        return unsafe { x86::lane_sums(acc) };
    }
    let _ = level;
    acc.map(|a| a.iter().sum())
}

/// [`run_tasks`] over a `[B, S, width]` output whose every position reads the E rows of
/// `y [E, N, d]` that its group has (its merged tokens, or their gradients): `body(task, ds,
/// rows, pieces)` runs for each of a task's positions `ds`, with those rows copied together
/// first (see [`gather`]).
///
/// # Safety
/// As [`run_tasks`]: over a task's positions, `body` must write every element of its pieces.
#[inline(always)]
unsafe fn run_per_position(
    len: usize, (b, s, width, g): (usize, usize, usize, usize), y: &[f32], (d, e): (usize, usize),
    body: impl Fn(Task, usize, &[f32], &mut [&mut [f32]]) + Sync,
) -> Vec<f32> {
    let k = b / g;
    // SAFETY: as the caller guarantees.
    unsafe {
        run_tasks(
            len,
            (b, s, width, g),
            Slabs::Rows,
            #[inline(always)]
            |t: Task, pieces: &mut [&mut [f32]]| {
                let mut rows = vec![0f32; e * d];
                for ds in 0..t.positions {
                    let n = t.kk * s + t.s0 + ds;
                    gather(&mut rows, e, d, |ex| &y[(ex * k * s + n) * d..][..d]);
                    body(t, ds, &rows, pieces);
                }
            },
        )
    }
}

pub fn group_softmax(z: &[f32], b: usize, s: usize, e: usize, g: usize) -> Vec<f32> {
    // SAFETY: every row of a piece is written, at every expert.
    unsafe {
        run_tasks(
            z.len(),
            (b, s, e, g),
            Slabs::Rows,
            #[inline(always)]
            |t: Task, rows: &mut [&mut [f32]]| {
                // Across the experts at once: member i's E logits are contiguous, so each step
                // below is a vector op over experts, and every expert still takes its max,
                // exponentials and sum over the members in order.
                let (mut mx, mut total) = (vec![0f32; e], vec![0f32; e]);
                for ds in 0..t.positions {
                    let logits = |i: usize| &z[((t.kk * g + i) * s + t.s0 + ds) * e..][..e];
                    mx.fill(f32::NEG_INFINITY);
                    for i in 0..g {
                        mx.iter_mut().zip(logits(i)).for_each(|(m, &v)| *m = m.max(v));
                    }
                    total.fill(0.0);
                    for (i, row) in rows.iter_mut().enumerate() {
                        let out = &mut row[ds * e..(ds + 1) * e];
                        for (((o, &v), &m), t) in
                            out.iter_mut().zip(logits(i)).zip(&mx).zip(&mut total)
                        {
                            *o = exp(v - m);
                            *t += *o;
                        }
                    }
                    for row in rows.iter_mut() {
                        let out = &mut row[ds * e..(ds + 1) * e];
                        out.iter_mut().zip(&total).for_each(|(o, &t)| *o /= t);
                    }
                }
            },
        )
    }
}

/// The softmax's backward, `dz_i = w_i ⊙ dw_i − w_i ⊙ Σ_group w_j ⊙ dw_j`, per expert and
/// across the experts at once, as [`group_softmax`] is.
pub fn group_softmax_backward(
    w: &[f32], dw: &[f32], b: usize, s: usize, e: usize, g: usize,
) -> Vec<f32> {
    // SAFETY: every row of a piece is written, at every expert.
    unsafe {
        run_tasks(
            w.len(),
            (b, s, e, g),
            Slabs::Rows,
            #[inline(always)]
            |t: Task, rows: &mut [&mut [f32]]| {
                let mut total = vec![0f32; e];
                for ds in 0..t.positions {
                    let at = |i: usize| ((t.kk * g + i) * s + t.s0 + ds) * e;
                    total.fill(0.0);
                    for i in 0..g {
                        let (wi, di) = (&w[at(i)..][..e], &dw[at(i)..][..e]);
                        for ((t, &w), &d) in total.iter_mut().zip(wi).zip(di) {
                            *t += w * d;
                        }
                    }
                    for (i, row) in rows.iter_mut().enumerate() {
                        let (wi, di) = (&w[at(i)..][..e], &dw[at(i)..][..e]);
                        let out = &mut row[ds * e..(ds + 1) * e];
                        for (((o, &w), &d), &t) in out.iter_mut().zip(wi).zip(di).zip(&total) {
                            *o = w * d - w * t;
                        }
                    }
                }
            },
        )
    }
}

pub fn merge(x: &[f32], w: &[f32], b: usize, s: usize, d: usize, e: usize, g: usize) -> Vec<f32> {
    let k = b / g;
    // SAFETY: `weighted_sums` writes every row of every expert's piece. m is [E·K, S, d].
    unsafe {
        run_tasks(
            e * k * s * d,
            (b, s, d, g),
            Slabs::Experts,
            #[inline(always)]
            |t: Task, experts: &mut [&mut [f32]]| {
                let mut members = vec![0f32; g * d];
                for ds in 0..t.positions {
                    let row = |i: usize| (t.kk * g + i) * s + t.s0 + ds;
                    gather(&mut members, g, d, |i| &x[row(i) * d..(row(i) + 1) * d]);
                    // Member i's weight for expert ex: w[row(i)·E + ex].
                    let c = Coefs { data: &w[row(0) * e..], term: s * e, out: 1 };
                    weighted_sums(t.level, experts, (ds * d, d), Store::Set, g, c, |i| {
                        &members[i * d..(i + 1) * d]
                    });
                }
            },
        )
    }
}

pub fn emit(y: &[f32], w: &[f32], b: usize, s: usize, d: usize, e: usize, g: usize) -> Vec<f32> {
    // SAFETY: `weighted_sums` writes every row of every member's piece.
    unsafe {
        run_per_position(
            b * s * d,
            (b, s, d, g),
            y,
            (d, e),
            #[inline(always)]
            |t, ds, experts, members| {
                // Member i's weight for expert ex, at `(kk·G + i)·S + s0 + ds` of w.
                let base = (t.kk * g * s + t.s0 + ds) * e;
                let c = Coefs { data: &w[base..], term: 1, out: s * e };
                weighted_sums(t.level, members, (ds * d, d), Store::Set, e, c, |ex| {
                    &experts[ex * d..(ex + 1) * d]
                });
            },
        )
    }
}

pub fn group_dot(
    a: &[f32], c: &[f32], b: usize, s: usize, d: usize, e: usize, g: usize,
) -> Vec<f32> {
    // SAFETY: `dots` writes every expert of every row of every member's piece.
    unsafe {
        run_per_position(
            b * s * e,
            (b, s, e, g),
            c,
            (d, e),
            #[inline(always)]
            |t, ds, experts, members| {
                let ai = |i: usize| &a[((t.kk * g + i) * s + t.s0 + ds) * d..][..d];
                dots_rows(t.level, (g, ai), experts, (d, e), members, ds * e);
            },
        )
    }
}

/// Emit's backward in one pass: `[dy | dw]`, `dy = merge(dout, w)` (`[E·K, S, d]`) and `dw =
/// group_dot(dout, y)` (`[B, S, E]`), each bit for bit the op it stands for. Both read the
/// group's rows of `dout`, which one pass reads once.
pub fn emit_backward(
    dout: &[f32], y: &[f32], w: &[f32], (b, s, d, e, g): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let k = b / g;
    let dy = Output { len: e * k * s * d, width: d, slabs: Slabs::Experts };
    let dw = Output { len: b * s * e, width: e, slabs: Slabs::Rows };
    // SAFETY: `weighted_sums` writes every row of every expert's piece of dy, `dots` every
    // expert of every member's piece of dw.
    unsafe {
        run_tasks2(
            [dy, dw],
            (b, s, g),
            positions_per_task(k, s),
            #[inline(always)]
            |t: Task, experts: &mut [&mut [f32]], members: &mut [&mut [f32]]| {
                let (mut outs, mut ys) = (vec![0f32; g * d], vec![0f32; e * d]);
                for ds in 0..t.positions {
                    let row = |i: usize| (t.kk * g + i) * s + t.s0 + ds;
                    let n = t.kk * s + t.s0 + ds;
                    gather(&mut outs, g, d, |i| &dout[row(i) * d..(row(i) + 1) * d]);
                    gather(&mut ys, e, d, |ex| &y[(ex * k * s + n) * d..][..d]);
                    let c = Coefs { data: &w[row(0) * e..], term: s * e, out: 1 };
                    weighted_sums(t.level, experts, (ds * d, d), Store::Stream, g, c, |i| {
                        &outs[i * d..(i + 1) * d]
                    });
                    let out_of = |i: usize| &outs[i * d..(i + 1) * d];
                    dots_rows(t.level, (g, out_of), &ys, (d, e), members, ds * e);
                }
            },
        )
    }
}

/// Merge's backward in one pass: `[dx | dw]`, `dx = emit(dm, w)` (`[B, S, d]`) and `dw =
/// group_dot(x, dm)` (`[B, S, E]`), each bit for bit the op it stands for. Both read the
/// group's merged-token gradients `dm`, which one pass gathers once.
pub fn merge_backward(
    dm: &[f32], x: &[f32], w: &[f32], (b, s, d, e, g): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let k = b / g;
    let dx = Output { len: b * s * d, width: d, slabs: Slabs::Rows };
    let dw = Output { len: b * s * e, width: e, slabs: Slabs::Rows };
    // SAFETY: `weighted_sums` writes every row of every member's piece of dx, `dots` every
    // expert of every member's piece of dw.
    unsafe {
        run_tasks2(
            [dx, dw],
            (b, s, g),
            positions_per_task(k, s),
            #[inline(always)]
            |t: Task, dxs: &mut [&mut [f32]], dws: &mut [&mut [f32]]| {
                let mut rows = vec![0f32; e * d];
                for ds in 0..t.positions {
                    let n = t.kk * s + t.s0 + ds;
                    gather(&mut rows, e, d, |ex| &dm[(ex * k * s + n) * d..][..d]);
                    let base = (t.kk * g * s + t.s0 + ds) * e;
                    let c = Coefs { data: &w[base..], term: 1, out: s * e };
                    weighted_sums(t.level, dxs, (ds * d, d), Store::Stream, e, c, |ex| {
                        &rows[ex * d..(ex + 1) * d]
                    });
                    let xi = |i: usize| &x[((t.kk * g + i) * s + t.s0 + ds) * d..][..d];
                    dots_rows(t.level, (g, xi), &rows, (d, e), dws, ds * e);
                }
            },
        )
    }
}
