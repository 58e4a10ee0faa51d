//! The CPU kernel of `ops::mot::mixing`: merge's backward with the softmax's and the
//! controller's folded in, on the task machinery of the other mixing kernels.

use super::*;

/// Merge's backward on AMX tiles (bf16 runs).
#[cfg(target_arch = "x86_64")]
mod tiles;

/// Whether merge's backward runs on the AMX tiles: the run's matmuls are bf16 on the tiles
/// engine (`run.dtype = "bf16"`), and groups of `g` over `e` experts, rows of `d`, fit them.
#[cfg(target_arch = "x86_64")]
fn on_tiles(d: usize, e: usize, g: usize) -> bool {
    use crate::ops::bf16;
    bf16::enabled() && bf16::engine() == Some(bf16::Engine::Tiles) && tiles::fits(d, e, g)
}

/// Tasks of [`mix_backward`]: about this many, whatever the number of threads, so that its
/// partial sums of the controller's gradient, added in task order, have the same bits on any
/// number of threads.
const MIX_TASKS: usize = 64;

/// Merge's backward with the softmax's and the controller's folded in, in one pass: `[dx |
/// dc]` from the merged tokens' gradients `dm`, the rows `x`, the weights `w = softmax(x·cᵀ)`
/// over each group, emit's weight gradient `from_emit` (none when emit's output had no
/// gradient) and the controller `c [E, d]`. Per group, with `dw = group_dot(x, dm) +
/// from_emit` and the softmax's backward `dz_i = w_i ⊙ dw_i − w_i ⊙ Σ_j w_j ⊙ dw_j`:
/// - `dx_i = Σ_e w[i, e]·dm_e + Σ_e dz[i, e]·c_e`, one weighted sum of 2E rows, stored once;
/// - `dc_e += Σ_i dz[i, e]·x_i`, into the task's partial sum, the partials added in order.
///
/// Each of these reads the group's rows while they sit in L1, where the separate ops read `x`
/// from memory once more, wrote a second `dx` and added the two. In a bf16 run on AMX tiles
/// the products run there instead ([`tiles::mix_backward`]).
pub fn mix_backward(
    dm: &[f32], x: &[f32], w: &[f32], from_emit: Option<&[f32]>, c: &[f32],
    (b, s, d, e, g): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if on_tiles(d, e, g) {
        // SAFETY: `on_tiles` checked that this run's products are on the tiles, which the CPU
        // has, and that the shapes fit them.
        return unsafe { tiles::mix_backward(dm, x, w, from_emit, c, (b, s, d, e, g)) };
    }
    let k = b / g;
    // SAFETY: `weighted_sums` writes every row of every member's piece of dx; each task zeroes
    // its partial before adding to it.
    unsafe {
        run_mix_tasks(
            (b, s, d, e, g),
            #[inline(always)]
            |t: Task, dxs: &mut [&mut [f32]], partial: &mut [&mut [f32]]| {
                let dc = &mut *partial[0];
                dc.fill(0.0);
                let (mut rows, mut members, mut sum) =
                    (vec![0f32; e * d], vec![0f32; g * d], vec![0f32; e * d]);
                let (mut dz, mut coefs, mut total) =
                    (vec![0f32; g * e], vec![0f32; g * 2 * e], vec![0f32; e]);
                // This position's `Σ_i dz[i, e]·x_i`, one row per expert, before it joins `dc`.
                let mut sums: Vec<&mut [f32]> = sum.chunks_exact_mut(d.max(1)).collect();
                for ds in 0..t.positions {
                    let n = t.kk * s + t.s0 + ds;
                    let row = |i: usize| (t.kk * g + i) * s + t.s0 + ds;
                    gather(&mut rows, e, d, |ex| &dm[(ex * k * s + n) * d..][..d]);
                    gather(&mut members, g, d, |i| &x[row(i) * d..][..d]);
                    // dw, member i's for expert ex at dz[i·E + ex]; then the softmax's backward
                    // in place.
                    let member = |i: usize| &members[i * d..(i + 1) * d];
                    let mut dzs: Vec<&mut [f32]> = dz.chunks_exact_mut(e).collect();
                    dots_rows(t.level, (g, member), &rows, (d, e), &mut dzs, 0);
                    let w_of = |i: usize| &w[row(i) * e..][..e];
                    let emit_of = |i: usize| from_emit.map(|de| &de[row(i) * e..][..e]);
                    softmax_backward(&mut dz, e, (g, e), w_of, emit_of, &mut total);
                    for (i, (dzi, ci)) in
                        dz.chunks_exact(e).zip(coefs.chunks_exact_mut(2 * e)).enumerate()
                    {
                        ci[..e].copy_from_slice(w_of(i));
                        ci[e..].copy_from_slice(dzi);
                    }
                    // Term j < E is dm_j with weight w[i, j]; term E + j is c_j with dz[i, j].
                    let c2 = Coefs { data: &coefs, term: 1, out: 2 * e };
                    weighted_sums(t.level, dxs, (ds * d, d), Store::Stream, 2 * e, c2, |j| match j
                        .checked_sub(e)
                    {
                        None => &rows[j * d..(j + 1) * d],
                        Some(j) => &c[j * d..(j + 1) * d],
                    });
                    let cz = Coefs { data: &dz, term: e, out: 1 };
                    weighted_sums(t.level, &mut sums, (0, d), Store::Set, g, cz, |i| {
                        &members[i * d..(i + 1) * d]
                    });
                    for (acc, part) in dc.chunks_exact_mut(d.max(1)).zip(&sums) {
                        acc.iter_mut().zip(part.iter()).for_each(|(a, &v)| *a += v);
                    }
                }
            },
        )
    }
}

/// [`mix_backward`]'s tasks, about [`MIX_TASKS`] of them: `body(task, dx, partial)` gets the
/// task's pieces of `dx [B, S, d]` and its own partial sum of `dc [E, d]`; returns `[dx | dc]`,
/// the partials added in task order (so the same bits on any number of threads).
///
/// # Safety
/// `body` must write every row of every member's piece of dx, and all of its partial.
#[inline(always)]
unsafe fn run_mix_tasks(
    (b, s, d, e, g): (usize, usize, usize, usize, usize),
    body: impl Fn(Task, &mut [&mut [f32]], &mut [&mut [f32]]) + Sync,
) -> Vec<f32> {
    let k = b / g;
    let sb = s.div_ceil(MIX_TASKS.div_ceil(k.max(1))).max(1);
    let tasks = k * s.div_ceil(sb);
    let dx = Output { len: b * s * d, width: d, slabs: Slabs::Rows };
    let partials = Output { len: tasks * e * d, width: e * d, slabs: Slabs::Tasks };
    // SAFETY: as the caller guarantees.
    let both = unsafe { run_tasks2([dx, partials], (b, s, g), sb, body) };
    sum_partials(both, b * s * d, e * d)
}

/// The softmax's backward over one group, in place: `dw` (member i's weight gradient for
/// expert ex at `dw[i·stride + ex]`, `(g, e)` of them) plus emit's (`from_emit(i)`, if any)
/// becomes `dz_i = w_i ⊙ dw_i − w_i ⊙ Σ_j w_j ⊙ dw_j`, with `w(i)` member i's weights.
#[inline(always)]
fn softmax_backward<'a>(
    dw: &mut [f32], stride: usize, (g, e): (usize, usize), w: impl Fn(usize) -> &'a [f32],
    from_emit: impl Fn(usize) -> Option<&'a [f32]>, total: &mut [f32],
) {
    for i in 0..g {
        if let Some(de) = from_emit(i) {
            dw[i * stride..][..e].iter_mut().zip(de).for_each(|(a, b)| *a += b);
        }
    }
    total.fill(0.0);
    for i in 0..g {
        let dwi = &dw[i * stride..][..e];
        total.iter_mut().zip(w(i)).zip(dwi).for_each(|((t, &w), &d)| *t += w * d);
    }
    for i in 0..g {
        for ((dz, &w), &t) in dw[i * stride..][..e].iter_mut().zip(w(i)).zip(&*total) {
            *dz = w * *dz - w * t;
        }
    }
}

/// `[dx | partials]` → `[dx | dc]`: the tasks' partial sums of the controller's gradient,
/// added in task order (so the same bits on any number of threads).
fn sum_partials(mut both: Vec<f32>, dx_len: usize, ed: usize) -> Vec<f32> {
    let tasks = (both.len() - dx_len) / ed.max(1);
    let (first, rest) = both[dx_len..].split_at_mut(ed.min(tasks * ed));
    for p in rest.chunks_exact(ed.max(1)) {
        first.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
    }
    both.resize(dx_len + ed, 0.0);
    both
}
