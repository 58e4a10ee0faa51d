// Mixture of Tokens mixing kernels: the CUDA side of src/ops/mot.rs, launched from
// src/ops/mot_cuda.rs. build.rs compiles this file to PTX, which the binary embeds.
//
// Shapes (all tensors contiguous, row-major):
//   x, a, out   [B, S, d]   activations: B batch rows, S positions, width d
//   z, w, r     [B, S, E]   one value per token and expert
//   m, y, c     [E, N, d]   one row per expert and group
// Group size G divides B; K = B / G groups per position, N = K * S groups in all. Batch row b at
// position s belongs to group n = (b / G) * S + s, whose members are the rows
// b' = (b / G) * G + i, i in [0, G), at the same position. Member i of group n = k * S + s is
// therefore row (k * G * S + s) + i * S of a [B * S, *] matrix: consecutive members are S rows
// apart. Every kernel below computes that "row of member 0" once and steps by S.
//
// Every kernel comes in f32 and bf16 (extern "C" names mot_<op>_f32 / mot_<op>_bf16); inputs and
// outputs share the dtype and all arithmetic is f32.
//
// Every kernel loops over its work units with a grid-stride loop, so any grid size is correct
// and the launch side only picks one that fills the GPU. Dimensions are ints (the launch side
// checks they fit); element offsets are computed in size_t, since B*S*d can exceed 2^31.

#include <cuda_bf16.h>

// Accumulators per thread: experts per pass in merge, members per pass in emit and group_dot.
// More would cut the re-reads of x (merge) and y (emit) further but cost registers.
#define MOT_REG 8
// Weights staged in shared memory per tile along the other axis (members in merge, experts in
// emit). The staged tile is MOT_TILE x MOT_REG floats = 1 KiB.
#define MOT_TILE 32
// The launch side never uses bigger blocks; telling ptxas lets it budget registers for them.
#define MOT_MAX_THREADS 256

__device__ __forceinline__ float load(const float *p) { return *p; }
__device__ __forceinline__ float load(const __nv_bfloat16 *p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float *p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float v) { *p = __float2bfloat16(v); }

// w[b, s, e] = softmax over the G members b of the group of z[., s, e], separately per expert.
// One thread per (group, expert): the G values are S*E elements apart, and consecutive threads
// take consecutive experts of a group (or, for small E, neighbouring positions), so each pass
// over the members reads contiguous runs. G is at most a few hundred, so a serial loop is fine.
// Online max/sum: one pass for the normaliser, one to write.
template <typename T>
__device__ void group_softmax_impl(const T *__restrict__ z, T *__restrict__ w, int B, int S, int E, int G) {
    const long long units = (long long)(B / G) * S * E;
    const size_t member_stride = (size_t)S * E;
    for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units;
         u += (long long)gridDim.x * blockDim.x) {
        const int e = (int)(u % E);
        const long long n = u / E;
        const int s = (int)(n % S);
        const long long k = n / S;
        const size_t base = ((size_t)k * G * S + s) * E + e;

        float mx = -INFINITY, sum = 0.f;
        for (int i = 0; i < G; ++i) {
            const float v = load(z + base + i * member_stride);
            if (v > mx) {
                sum *= expf(mx - v); // rescale the sum so far to the new maximum
                mx = v;
            }
            sum += expf(v - mx);
        }
        const float inv = 1.f / sum;
        for (int i = 0; i < G; ++i) {
            const size_t o = base + i * member_stride;
            store(w + o, expf(load(z + o) - mx) * inv);
        }
    }
}

// m[e, n, :] = sum over members i of group n of w[b_i, s, e] * x[b_i, s, :].
// A block owns (group n, chunk of blockDim.x columns of d), one column per thread, so every
// global read and write is coalesced over d. Each thread keeps MOT_REG experts' sums in
// registers and walks the G members; the members' weights for those experts are staged in
// shared memory MOT_TILE members at a time and read as broadcasts. With E > MOT_REG the block
// walks its x chunk again for the next MOT_REG experts; that chunk (G x blockDim.x values) is
// small enough to come from cache.
template <typename T>
__device__ void merge_impl(const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ m, int B, int S, int d,
                           int E, int G) {
    __shared__ __align__(16) float ws[MOT_TILE][MOT_REG]; // [member in tile][expert in pass]
    const long long N = (long long)(B / G) * S;
    const int chunks = (d + blockDim.x - 1) / blockDim.x;
    const long long units = N * chunks;
    for (long long u = blockIdx.x; u < units; u += gridDim.x) {
        const long long n = u / chunks;
        const int j = (int)(u % chunks) * blockDim.x + threadIdx.x; // may be >= d: stages, no I/O
        const int s = (int)(n % S);
        const size_t row0 = (size_t)(n / S) * G * S + s;

        for (int e0 = 0; e0 < E; e0 += MOT_REG) {
            float acc[MOT_REG];
#pragma unroll
            for (int r = 0; r < MOT_REG; ++r) acc[r] = 0.f;

            for (int i0 = 0; i0 < G; i0 += MOT_TILE) {
                const int cnt = min(MOT_TILE, G - i0);
                __syncthreads(); // everyone is done reading the previous tile
                for (int t = threadIdx.x; t < MOT_TILE * MOT_REG; t += blockDim.x) {
                    const int i = t / MOT_REG, r = t % MOT_REG;
                    float v = 0.f; // padding experts get weight 0, so the FMAs below need no test
                    if (i < cnt && e0 + r < E) v = load(w + (row0 + (size_t)(i0 + i) * S) * E + e0 + r);
                    ws[i][r] = v;
                }
                __syncthreads();
                if (j < d) {
                    for (int i = 0; i < cnt; ++i) {
                        const float xv = load(x + (row0 + (size_t)(i0 + i) * S) * d + j);
#pragma unroll
                        for (int r = 0; r < MOT_REG; ++r) acc[r] += ws[i][r] * xv;
                    }
                }
            }
            if (j < d) {
#pragma unroll
                for (int r = 0; r < MOT_REG; ++r)
                    if (e0 + r < E) store(m + ((size_t)(e0 + r) * N + n) * d + j, acc[r]);
            }
        }
    }
}

// out[b, s, :] = sum over experts e of w[b, s, e] * y[e, n(b, s), :].
// The mirror image of merge: a block owns (group n, chunk of d), a thread one column; each
// thread keeps MOT_REG members' outputs in registers and walks the experts, with the members'
// weights staged MOT_TILE experts at a time. Each y value read serves MOT_REG members, and the
// block re-reads its y chunk (E x blockDim.x values) once per MOT_REG members.
template <typename T>
__device__ void emit_impl(const T *__restrict__ y, const T *__restrict__ w, T *__restrict__ out, int B, int S, int d,
                          int E, int G) {
    __shared__ __align__(16) float ws[MOT_TILE][MOT_REG]; // [expert in tile][member in pass]
    const long long N = (long long)(B / G) * S;
    const int chunks = (d + blockDim.x - 1) / blockDim.x;
    const long long units = N * chunks;
    for (long long u = blockIdx.x; u < units; u += gridDim.x) {
        const long long n = u / chunks;
        const int j = (int)(u % chunks) * blockDim.x + threadIdx.x;
        const int s = (int)(n % S);
        const size_t row0 = (size_t)(n / S) * G * S + s;

        for (int i0 = 0; i0 < G; i0 += MOT_REG) {
            float acc[MOT_REG];
#pragma unroll
            for (int r = 0; r < MOT_REG; ++r) acc[r] = 0.f;

            for (int e0 = 0; e0 < E; e0 += MOT_TILE) {
                const int cnt = min(MOT_TILE, E - e0);
                __syncthreads();
                // Read in w's order (consecutive threads, consecutive experts) and store transposed,
                // so that the loop below reads one expert's MOT_REG weights as contiguous floats.
                for (int t = threadIdx.x; t < MOT_TILE * MOT_REG; t += blockDim.x) {
                    const int r = t / MOT_TILE, c = t % MOT_TILE;
                    float v = 0.f; // padding members get weight 0; their sums are never stored
                    if (i0 + r < G && c < cnt) v = load(w + (row0 + (size_t)(i0 + r) * S) * E + e0 + c);
                    ws[c][r] = v;
                }
                __syncthreads();
                if (j < d) {
                    for (int c = 0; c < cnt; ++c) {
                        const float yv = load(y + ((size_t)(e0 + c) * N + n) * d + j);
#pragma unroll
                        for (int r = 0; r < MOT_REG; ++r) acc[r] += ws[c][r] * yv;
                    }
                }
            }
            if (j < d) {
#pragma unroll
                for (int r = 0; r < MOT_REG; ++r)
                    if (i0 + r < G) store(out + (row0 + (size_t)(i0 + r) * S) * d + j, acc[r]);
            }
        }
    }
}

// r[b, s, e] = dot(a[b, s, :], c[e, n(b, s), :]), the weights' gradient of merge and emit.
// A block owns (group n, MOT_REG consecutive members); its warps take the experts in turn. For
// an expert, each lane walks d with stride 32 (coalesced) keeping one partial sum per member, so
// each c value read serves MOT_REG members; the sums are then reduced across the warp with
// shuffles. The members' a rows are re-read for every expert, from cache.
// blockDim.x must be a multiple of 32: the shuffles assume full warps.
template <typename T>
__device__ void group_dot_impl(const T *__restrict__ a, const T *__restrict__ c, T *__restrict__ r, int B, int S, int d,
                               int E, int G) {
    if (blockDim.x % 32 != 0) __trap(); // a launch-side bug; fail loudly, never return garbage
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const long long N = (long long)(B / G) * S;
    const int tiles = (G + MOT_REG - 1) / MOT_REG;
    const long long units = N * tiles;
    const size_t member_stride = (size_t)S * d; // between consecutive members' rows of a
    for (long long u = blockIdx.x; u < units; u += gridDim.x) {
        const long long n = u / tiles;
        const int i0 = (int)(u % tiles) * MOT_REG;
        const int cnt = min(MOT_REG, G - i0);
        const int s = (int)(n % S);
        const size_t row0 = (size_t)(n / S) * G * S + s + (size_t)i0 * S; // row of member i0
        const T *a0 = a + row0 * d;

        for (int e = warp; e < E; e += warps) {
            const T *crow = c + ((size_t)e * N + n) * d;
            float acc[MOT_REG];
#pragma unroll
            for (int i = 0; i < MOT_REG; ++i) acc[i] = 0.f;
            for (int j = lane; j < d; j += 32) {
                const float cv = load(crow + j);
#pragma unroll
                for (int i = 0; i < MOT_REG; ++i)
                    if (i < cnt) acc[i] += load(a0 + i * member_stride + j) * cv;
            }
#pragma unroll
            for (int i = 0; i < MOT_REG; ++i)
                for (int off = 16; off > 0; off /= 2) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
            if (lane == 0) {
#pragma unroll
                for (int i = 0; i < MOT_REG; ++i)
                    if (i < cnt) store(r + (row0 + (size_t)i * S) * E + e, acc[i]);
            }
        }
    }
}

// The entry points. Argument order: inputs, output, then B, S, [d,] E, G.

typedef __nv_bfloat16 bf16;

extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_group_softmax_f32(const float *z, float *w, int B, int S, int E, int G) {
    group_softmax_impl(z, w, B, S, E, G);
}
extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_group_softmax_bf16(const bf16 *z, bf16 *w, int B, int S, int E, int G) {
    group_softmax_impl(z, w, B, S, E, G);
}

extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_merge_f32(const float *x, const float *w, float *m, int B, int S, int d, int E, int G) {
    merge_impl(x, w, m, B, S, d, E, G);
}
extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_merge_bf16(const bf16 *x, const bf16 *w, bf16 *m, int B, int S, int d, int E, int G) {
    merge_impl(x, w, m, B, S, d, E, G);
}

extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_emit_f32(const float *y, const float *w, float *out, int B, int S, int d, int E, int G) {
    emit_impl(y, w, out, B, S, d, E, G);
}
extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_emit_bf16(const bf16 *y, const bf16 *w, bf16 *out, int B, int S, int d, int E, int G) {
    emit_impl(y, w, out, B, S, d, E, G);
}

extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_group_dot_f32(const float *a, const float *c, float *r, int B, int S, int d, int E, int G) {
    group_dot_impl(a, c, r, B, S, d, E, G);
}
extern "C" __global__ void __launch_bounds__(MOT_MAX_THREADS)
mot_group_dot_bf16(const bf16 *a, const bf16 *c, bf16 *r, int B, int S, int d, int E, int G) {
    group_dot_impl(a, c, r, B, S, d, E, G);
}
