"""The CUDA kernel sources of ``cuda.py`` (``mx.fast.cuda_kernel`` bodies), forward side: the shared header, the
selections (row top-k, the BatchTopK radix histogram and entry compaction), decode and the gathered dot products.
The backward and optimizer kernels are in ``cuda_sources_backward.py``; what each kernel computes is listed in
``cuda.py``'s docstring."""

HEADER = r"""
__device__ __forceinline__ unsigned int hk_key(float f) {
  unsigned int b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float hk_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
// element i (a multiple of 4 for hk_ld4) of a float32 (LP false) or bfloat16 (LP true) array, as float
template <bool LP> __device__ __forceinline__ float hk_ld1(const void* p, size_t i) {
  if (LP) return hk_bf16(reinterpret_cast<const unsigned short*>(p)[i]);
  return reinterpret_cast<const float*>(p)[i];
}
template <bool LP> __device__ __forceinline__ float4 hk_ld4(const void* p, size_t i) {
  if (LP) {
    const uint2 u = *reinterpret_cast<const uint2*>(reinterpret_cast<const unsigned short*>(p) + i);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                       __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
  }
  return *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(p) + i);
}
// VEC consecutive floats (VEC 4: one float4) at p + i, to / from a register array
template <int VEC> __device__ __forceinline__ void hk_ldv(const float* p, size_t i, float* out) {
  if (VEC == 4) {
    const float4 a = *reinterpret_cast<const float4*>(p + i);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  } else {
    for (int j = 0; j < VEC; ++j) out[j] = p[i + j];
  }
}
template <int VEC> __device__ __forceinline__ void hk_stv(float* p, size_t i, const float* v) {
  if (VEC == 4) *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
  else for (int j = 0; j < VEC; ++j) p[i + j] = v[j];
}
// float -> bfloat16 bits, round to nearest even (as astype), NaN kept quiet
__device__ __forceinline__ unsigned short hk_to_bf16(float f) {
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
template <int VEC> __device__ __forceinline__ void hk_stbf(void* p, size_t i, const float* v) {
  unsigned short* q = reinterpret_cast<unsigned short*>(p) + i;
  if (VEC == 4) {
    uint2 w;
    w.x = (unsigned int)hk_to_bf16(v[0]) | ((unsigned int)hk_to_bf16(v[1]) << 16);
    w.y = (unsigned int)hk_to_bf16(v[2]) | ((unsigned int)hk_to_bf16(v[3]) << 16);
    *reinterpret_cast<uint2*>(q) = w;
  } else {
    for (int j = 0; j < VEC; ++j) q[j] = hk_to_bf16(v[j]);
  }
}
__device__ __forceinline__ float hk_block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (l == 0) red[w] = v;
  __syncthreads();
  float t = (threadIdx.x < nw) ? red[threadIdx.x] : 0.f;
  if (w == 0) { for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o); if (l == 0) red[32] = t; }
  __syncthreads();
  return red[32];
}
"""

ROW_TOPK = r"""
  // template: K, F, BF16 (bool), HAS_DEAD (bool), RELU (bool: relu the written values), PF (bool: prefilter),
  // CAP (candidate capacity of the prefilter, >= blockDim.x)
  //
  // PF: each thread's largest key over its entries i = tid + j*nt; the K-th largest of these nt maxima, m, is
  // a lower bound of the row's K-th largest key (K threads each own an entry >= m; needs K <= nt). The entries
  // with key >= m (usually a few hundred) are compacted into shared memory and the radix select runs on them.
  // If more than CAP qualify (ties, dead masks), the select runs on the whole row instead. Either way the
  // result is the exact top K.
  __shared__ unsigned int hist[256];
  __shared__ unsigned int sel[2];
  __shared__ unsigned int cnt[2];
  __shared__ unsigned int ckey[PF ? CAP : 1];
  __shared__ unsigned int cidx[PF ? CAP : 1];
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const size_t base = (size_t)row * F;
  const unsigned short* p16 = reinterpret_cast<const unsigned short*>(pre);
  const float* p32 = reinterpret_cast<const float*>(pre);
  constexpr int KEYBITS = BF16 ? 16 : 32;
  auto value = [&](int i) -> float { return BF16 ? hk_bf16(p16[base + i]) : p32[base + i]; };
  auto keyof = [&](int i) -> unsigned int {
    if (HAS_DEAD && dead[i] == 0.f) return 0u;
    return hk_key(value(i)) >> (32 - KEYBITS);
  };
  // the keys a select runs over: 0 the row, 1 the per-thread maxima (ckey[0:nt]), 2 the candidates (ckey)
  auto keyat = [&](int mode, int i) -> unsigned int { return mode == 0 ? keyof(i) : ckey[i]; };
  // radix select of the want-th largest key among n (block-uniform): prefix = that key, remaining = how many
  // entries equal to it are kept
  auto radix = [&](int mode, int n, unsigned int want, unsigned int& prefix, unsigned int& remaining) {
    prefix = 0; remaining = want;
    for (int shift = KEYBITS - 8; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += nt) hist[i] = 0;
      __syncthreads();
      const unsigned int himask = (shift + 8 >= KEYBITS) ? 0u : ((0xFFFFFFFFu << (shift + 8)) & (KEYBITS == 32 ? 0xFFFFFFFFu : 0xFFFFu));
      for (int i0 = 0; i0 < n; i0 += nt) {  // block-uniform trip count: whole warps in __match_any_sync
        const int i = i0 + tid;
        unsigned int digit = 256u;
        if (i < n) {
          unsigned int key = keyat(mode, i);
          if ((key & himask) == (prefix & himask)) digit = (key >> shift) & 255u;
        }
        unsigned int peers = __match_any_sync(0xffffffffu, digit);
        if (digit < 256u && (tid & 31) == (__ffs(peers) - 1)) atomicAdd(&hist[digit], (unsigned int)__popc(peers));
      }
      __syncthreads();
      if (tid < 32) {
        unsigned int s = 0;
        for (int j = 0; j < 8; ++j) s += hist[255 - 8 * tid - j];
        unsigned int c = s;
        for (int o = 1; o < 32; o <<= 1) { unsigned int t = __shfl_up_sync(0xffffffffu, c, o); if (tid >= o) c += t; }
        unsigned int ball = __ballot_sync(0xffffffffu, c >= remaining);
        int L = ball ? (__ffs(ball) - 1) : 31;
        if (tid == L) {
          unsigned int before = c - s;
          int bin = 255 - 8 * tid - 7;
          for (int j = 0; j < 8; ++j) {
            int b = 255 - 8 * tid - j; unsigned int h = hist[b];
            if (before + h >= remaining) { bin = b; break; }
            before += h;
          }
          sel[0] = prefix | ((unsigned int)bin << shift);
          sel[1] = remaining - before;
        }
      }
      __syncthreads();
      prefix = sel[0];
      remaining = sel[1];
      __syncthreads();
    }
  };
  int mode = 0, n = F;
  if (PF) {
    unsigned int mx_ = 0;
    for (int i = tid; i < F; i += nt) { const unsigned int kk = keyof(i); mx_ = kk > mx_ ? kk : mx_; }
    ckey[tid] = mx_;
    if (tid == 0) cnt[0] = 0;
    __syncthreads();
    unsigned int m, r_;
    radix(1, nt, K, m, r_);
    for (int i0 = 0; i0 < F; i0 += nt) {  // compact the entries with key >= m (block-uniform trip count)
      const int i = i0 + tid;
      unsigned int kk = 0;
      bool c = false;
      if (i < F) { kk = keyof(i); c = kk >= m; }
      const unsigned int b = __ballot_sync(0xffffffffu, c);
      if (b) {
        const int leader = __ffs(b) - 1;
        unsigned int at = 0;
        if ((tid & 31) == leader) at = atomicAdd(&cnt[0], (unsigned int)__popc(b));
        at = __shfl_sync(0xffffffffu, at, leader);
        if (c) {
          const unsigned int pos = at + __popc(b & ((1u << (tid & 31)) - 1u));
          if (pos < CAP) { ckey[pos] = kk; cidx[pos] = (unsigned int)i; }
        }
      }
    }
    __syncthreads();
    const unsigned int nc = cnt[0];
    if (nc <= CAP) { mode = 2; n = (int)nc; }
    __syncthreads();
  }
  unsigned int prefix, remaining;
  radix(mode, n, K, prefix, remaining);
  if (tid == 0) { cnt[0] = 0; cnt[1] = 0; }
  __syncthreads();
  const unsigned int n_gt = K - remaining;
  for (int i = tid; i < n; i += nt) {
    const unsigned int key = keyat(mode, i);
    const int col = mode == 2 ? (int)cidx[i] : i;
    int slot = -1;
    if (key > prefix) slot = (int)atomicAdd(&cnt[0], 1u);
    else if (key == prefix) { unsigned int s = atomicAdd(&cnt[1], 1u); if (s < remaining) slot = (int)(n_gt + s); }
    if (slot >= 0) {
      float v = (key == 0u) ? 0.f : value(col);
      vals[(size_t)row * K + slot] = RELU ? (v > 0.f ? v : 0.f) : v;
      idx[(size_t)row * K + slot] = (uint32_t)col;
    }
  }
"""

RADIX_HIST = r"""
  // template: KIND (0 uint32 keys, 1 fp32 values, 2 bf16 values: keys of relu(value)), SHIFT
  __shared__ unsigned int h[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
  __syncthreads();
  const unsigned int pre_ = prefix[0];
  const unsigned int himask = (SHIFT >= 24) ? 0u : (0xFFFFFFFFu << (SHIFT + 8));
  const size_t n = keys_shape[0];
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  const size_t start = (size_t)blockIdx.x * blockDim.x;
  for (size_t i0 = start; i0 < n; i0 += stride) {  // block-uniform trip count: whole warps in __match_any_sync
    size_t i = i0 + threadIdx.x;
    unsigned int digit = 256u;
    if (i < n) {
      unsigned int key;
      if (KIND == 0) key = reinterpret_cast<const unsigned int*>(keys)[i];
      else {
        float v = (KIND == 1) ? reinterpret_cast<const float*>(keys)[i] : hk_bf16(reinterpret_cast<const unsigned short*>(keys)[i]);
        key = hk_key(v > 0.f ? v : 0.f);
      }
      if ((key & himask) == (pre_ & himask)) digit = (key >> SHIFT) & 255u;
    }
    unsigned int peers = __match_any_sync(0xffffffffu, digit);
    if (digit < 256u && (threadIdx.x & 31) == (__ffs(peers) - 1)) atomicAdd(&h[digit], (unsigned int)__popc(peers));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) if (h[i]) atomicAdd(&hist[i], h[i]);
"""

DECODE = r"""
  // template: KK, D (D % 4 == 0), LPW (W in bfloat16)
  const int b = blockIdx.x;
  const float* v = vals + (size_t)b * KK;
  const uint32_t* ix = idx + (size_t)b * KK;
  for (int d4 = threadIdx.x; d4 < D / 4; d4 += blockDim.x) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < KK; ++j) {
      float a = v[j];
      if (a != 0.f) {
        float4 w = hk_ld4<LPW>(W, (size_t)ix[j] * D + 4 * d4);
        acc.x += a * w.x; acc.y += a * w.y; acc.z += a * w.z; acc.w += a * w.w;
      }
    }
    reinterpret_cast<float4*>(out)[(size_t)b * (D / 4) + d4] = acc;
  }
"""

GATHER_DOT = r"""
  // template: KK, D (D % 4 == 0), LPW (W in bfloat16); 256 threads
  __shared__ float4 y[D / 4];
  const int b = blockIdx.x;
  const float4* Y4 = reinterpret_cast<const float4*>(dY) + (size_t)b * (D / 4);
  for (int i = threadIdx.x; i < D / 4; i += blockDim.x) y[i] = Y4[i];
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  for (int j = warp; j < KK; j += nw) {
    const size_t w0 = (size_t)idx[(size_t)b * KK + j] * D;
    float acc = 0.f;
    for (int d4 = lane; d4 < D / 4; d4 += 32) {
      float4 a = hk_ld4<LPW>(W, w0 + 4 * d4), c = y[d4];
      acc += a.x * c.x + a.y * c.y + a.z * c.z + a.w * c.w;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[(size_t)b * KK + j] = acc;
  }
"""

BT_COUNTS = r"""
  // template: F, BF16; one 256-thread block per row: counts[row] = (#entries with relu(pre) > t, # with == t),
  // t = thresh[0] (the batch's cut, relu'd)
  __shared__ unsigned int c[2];
  if (threadIdx.x == 0) { c[0] = 0; c[1] = 0; }
  __syncthreads();
  const size_t base = (size_t)blockIdx.x * F;
  const float t = thresh[0];
  unsigned int gt = 0, eq = 0;
  for (int i = threadIdx.x; i < F; i += blockDim.x) {
    const float v = BF16 ? hk_bf16(reinterpret_cast<const unsigned short*>(pre)[base + i])
                         : reinterpret_cast<const float*>(pre)[base + i];
    const float a = v > 0.f ? v : 0.f;
    gt += a > t;
    eq += a == t;
  }
  for (int o = 16; o > 0; o >>= 1) {
    gt += __shfl_xor_sync(0xffffffffu, gt, o);
    eq += __shfl_xor_sync(0xffffffffu, eq, o);
  }
  if ((threadIdx.x & 31) == 0) { atomicAdd(&c[0], gt); atomicAdd(&c[1], eq); }
  __syncthreads();
  if (threadIdx.x == 0) { counts[2 * blockIdx.x] = (int)c[0]; counts[2 * blockIdx.x + 1] = (int)c[1]; }
"""

BT_COMPACT = r"""
  // template: F, BF16; one 256-thread block per row. Writes the row's kept entries in column order from
  // off[row]: every relu(pre) > t, and the first take[row] of those == t (the batch's ties go to the first rows).
  // Ordered compaction, 256 columns at a time: warp ballots, then the warps' totals in shared memory.
  __shared__ unsigned int wg[8], we[8];
  const int row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const size_t base = (size_t)row * F;
  const float t = thresh[0];
  const unsigned int take_ = (unsigned int)take[row];
  const unsigned int out0 = (unsigned int)off[row];
  const unsigned int lt = (1u << lane) - 1u;
  unsigned int kept_before = 0, ties_before = 0;
  for (int c0 = 0; c0 < F; c0 += 256) {  // block-uniform trip count
    const int i = c0 + tid;
    float a = 0.f;
    bool g = false, e = false;
    if (i < F) {
      const float v = BF16 ? hk_bf16(reinterpret_cast<const unsigned short*>(pre)[base + i])
                           : reinterpret_cast<const float*>(pre)[base + i];
      a = v > 0.f ? v : 0.f;
      g = a > t;
      e = a == t;
    }
    const unsigned int bg = __ballot_sync(0xffffffffu, g), be = __ballot_sync(0xffffffffu, e);
    if (lane == 0) { wg[warp] = __popc(bg); we[warp] = __popc(be); }
    __syncthreads();
    unsigned int og = 0, oe = 0, tg = 0, te = 0;
    for (int w = 0; w < 8; ++w) {
      if (w < warp) { og += wg[w]; oe += we[w]; }
      tg += wg[w]; te += we[w];
    }
    __syncthreads();
    const unsigned int left = take_ > ties_before ? take_ - ties_before : 0u;
    const unsigned int m = left < te ? left : te;  // the chunk's ties that are kept: its first m
    const unsigned int gx = og + __popc(bg & lt), ex = oe + __popc(be & lt);
    if (g || (e && ex < m)) {
      const unsigned int slot = out0 + kept_before + gx + (ex < m ? ex : m);
      rows[slot] = (uint32_t)row;
      cols[slot] = (uint32_t)i;
      vals[slot] = a;
    }
    kept_before += tg + m;
    ties_before += te;
  }
"""

ENTRIES_DOT = r"""
  // template: N (entries), D (D % 4 == 0), LPW (W in bfloat16); one warp per entry: out[e] = dY[rows_e] . W[cols_e]
  const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (e >= N) return;  // (warp-uniform)
  const float4* y = reinterpret_cast<const float4*>(dY + (size_t)rows[e] * D);
  const size_t w0 = (size_t)cols[e] * D;
  float acc = 0.f;
  for (int d4 = lane; d4 < D / 4; d4 += 32) {
    const float4 a = y[d4], w = hk_ld4<LPW>(W, w0 + 4 * d4);
    acc += a.x * w.x + a.y * w.y + a.z * w.z + a.w * w.w;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) out[e] = acc;
"""
