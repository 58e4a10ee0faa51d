//! The CPU kernel of `ops::mot::mixing`: merge's backward with the softmax's and the
//! controller's folded in, on the task machinery of the other mixing kernels.

use super::*;

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
/// from memory once more, wrote a second `dx` and added the two.
pub fn mix_backward(
    dm: &[f32], x: &[f32], w: &[f32], from_emit: Option<&[f32]>, c: &[f32],
    (b, s, d, e, g): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let k = b / g;
    let sb = s.div_ceil(MIX_TASKS.div_ceil(k.max(1))).max(1);
    let tasks = k * s.div_ceil(sb);
    let dx = Output { len: b * s * d, width: d, slabs: Slabs::Rows };
    let partials = Output { len: tasks * e * d, width: e * d, slabs: Slabs::Tasks };
    // SAFETY: `weighted_sums` writes every row of every member's piece of dx; each task zeroes
    // its partial before adding to it.
    let mut both = unsafe {
        run_tasks2(
            [dx, partials],
            (b, s, g),
            sb,
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
                    for (i, dwi) in dz.chunks_exact_mut(e).enumerate() {
                        dots(t.level, &members[i * d..(i + 1) * d], &rows, d, dwi);
                        if let Some(de) = from_emit {
                            dwi.iter_mut().zip(&de[row(i) * e..][..e]).for_each(|(a, b)| *a += b);
                        }
                    }
                    total.fill(0.0);
                    for (i, dwi) in dz.chunks_exact(e).enumerate() {
                        let wi = &w[row(i) * e..][..e];
                        total.iter_mut().zip(wi).zip(dwi).for_each(|((t, &w), &d)| *t += w * d);
                    }
                    for (i, (dzi, ci)) in
                        dz.chunks_exact_mut(e).zip(coefs.chunks_exact_mut(2 * e)).enumerate()
                    {
                        let wi = &w[row(i) * e..][..e];
                        for ((dz, &w), &t) in dzi.iter_mut().zip(wi).zip(&total) {
                            *dz = w * *dz - w * t;
                        }
                        ci[..e].copy_from_slice(wi);
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
    };
    // dc: the partials, added in task order, in place of the first.
    let (dx_len, ed) = (b * s * d, e * d);
    let (first, rest) = both[dx_len..].split_at_mut(ed.min(tasks * ed));
    for p in rest.chunks_exact(ed.max(1)) {
        first.iter_mut().zip(p).for_each(|(a, &v)| *a += v);
    }
    both.resize(dx_len + ed, 0.0);
    both
}
