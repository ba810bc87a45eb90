"""The Metal kernel sources of ``metal.py`` (``mx.fast.metal_kernel`` bodies and their shared header): the CUDA
design (``cuda_sources.py``, ``cuda_sources_backward.py``) in Metal, with the same names, arguments and templates,
so that ``gpu.GpuOps`` launches both. Differences: no warp-match aggregation (plain threadgroup atomics); the row
top-k without the prefilter (it selects over the whole row: ``PF`` is ignored); scalar loads in the decoder Adam
pass (``VEC`` ignored); none of the optional kernels (the float4 and scatter-add per-latent gradient variants, the
elementwise Adam, which is then MLX's, and the sparse BatchTopK entries, which then keep the dense mask)."""

HEADER = r"""
inline uint hk_key(float f) {
  uint b = as_type<uint>(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
"""

ROW_TOPK = r"""
  // template: K, F, BF16 (bool: bf16 pre, keys of 16 bits; else fp32, 32 bits), HAS_DEAD, RELU
  constexpr int KEYBITS = BF16 ? 16 : 32;
  threadgroup atomic_uint hist[256];
  threadgroup uint sel[2];
  threadgroup atomic_uint cnt[2];
  const uint row = threadgroup_position_in_grid.x;
  const uint tid = thread_position_in_threadgroup.x;
  const uint nt = threads_per_threadgroup.x;
  const size_t base = (size_t)row * F;
  uint prefix = 0, remaining = K;
  for (int shift = KEYBITS - 8; shift >= 0; shift -= 8) {
    for (uint i = tid; i < 256; i += nt) atomic_store_explicit(&hist[i], 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint himask = (shift + 8 >= KEYBITS) ? 0u : ((0xFFFFFFFFu << (shift + 8)) & (KEYBITS == 32 ? 0xFFFFFFFFu : 0xFFFFu));
    for (uint i = tid; i < F; i += nt) {
      uint key = (HAS_DEAD && dead[i] == 0.0f) ? 0u : (hk_key(float(pre[base + i])) >> (32 - KEYBITS));
      if ((key & himask) == (prefix & himask)) atomic_fetch_add_explicit(&hist[(key >> shift) & 255u], 1u, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
      uint before = 0; int bin = 0;
      for (int b = 255; b >= 0; --b) {
        uint h = atomic_load_explicit(&hist[b], memory_order_relaxed);
        if (before + h >= remaining) { bin = b; break; }
        before += h;
      }
      sel[0] = prefix | ((uint)bin << shift);
      sel[1] = remaining - before;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    prefix = sel[0];
    remaining = sel[1];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) { atomic_store_explicit(&cnt[0], 0u, memory_order_relaxed); atomic_store_explicit(&cnt[1], 0u, memory_order_relaxed); }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint n_gt = K - remaining;
  for (uint i = tid; i < F; i += nt) {
    uint key = (HAS_DEAD && dead[i] == 0.0f) ? 0u : (hk_key(float(pre[base + i])) >> (32 - KEYBITS));
    int slot = -1;
    if (key > prefix) slot = (int)atomic_fetch_add_explicit(&cnt[0], 1u, memory_order_relaxed);
    else if (key == prefix) { uint s = atomic_fetch_add_explicit(&cnt[1], 1u, memory_order_relaxed); if (s < remaining) slot = (int)(n_gt + s); }
    if (slot >= 0) {
      float v = (key == 0u) ? 0.0f : float(pre[base + i]);
      vals[(size_t)row * K + slot] = RELU ? (v > 0.0f ? v : 0.0f) : v;
      idx[(size_t)row * K + slot] = i;
    }
  }
"""

RADIX_HIST = r"""
  // template: KIND (0 uint32 keys, 1 float values -> keys of relu), SHIFT; hist is atomic, zero-initialised
  threadgroup atomic_uint h[256];
  const uint tid = thread_position_in_threadgroup.x;
  const uint nt = threads_per_threadgroup.x;
  for (uint i = tid; i < 256; i += nt) atomic_store_explicit(&h[i], 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint pre_ = prefix[0];
  const uint himask = (SHIFT >= 24) ? 0u : (0xFFFFFFFFu << (SHIFT + 8));
  const size_t n = keys_shape[0];
  const size_t stride = (size_t)threadgroups_per_grid.x * nt;
  for (size_t i = (size_t)threadgroup_position_in_grid.x * nt + tid; i < n; i += stride) {
    uint key;
    if (KIND == 0) key = as_type<uint>(keys[i]);
    else { float v = float(keys[i]); key = hk_key(v > 0.0f ? v : 0.0f); }
    if ((key & himask) == (pre_ & himask)) atomic_fetch_add_explicit(&h[(key >> SHIFT) & 255u], 1u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < 256; i += nt) {
    uint c = atomic_load_explicit(&h[i], memory_order_relaxed);
    if (c) atomic_fetch_add_explicit(&hist[i], c, memory_order_relaxed);
  }
"""

DECODE = r"""
  // template: KK, D (D % 4 == 0), LPW (W is bfloat16; the reads convert either)
  const uint b = threadgroup_position_in_grid.x;
  for (uint d4 = thread_position_in_threadgroup.x; d4 < D / 4; d4 += threads_per_threadgroup.x) {
    float4 acc = float4(0.0f);
    for (int j = 0; j < KK; ++j) {
      float a = vals[(size_t)b * KK + j];
      if (a != 0.0f) {
        const size_t o = (size_t)idx[(size_t)b * KK + j] * D + 4 * d4;
        acc += a * float4(static_cast<float>(W[o]), static_cast<float>(W[o + 1]), static_cast<float>(W[o + 2]),
                          static_cast<float>(W[o + 3]));
      }
    }
    ((device float4*)out)[(size_t)b * (D / 4) + d4] = acc;
  }
"""

GATHER_DOT = r"""
  // template: KK, D (D % 4 == 0), LPW (W is bfloat16; the reads convert either); 256 threads (8 simdgroups of 32)
  threadgroup float4 y[D / 4];
  const uint b = threadgroup_position_in_grid.x;
  const uint tid = thread_position_in_threadgroup.x;
  for (uint i = tid; i < D / 4; i += 256) y[i] = ((const device float4*)dY)[(size_t)b * (D / 4) + i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint warp = tid / 32, lane = tid % 32;
  for (uint j = warp; j < KK; j += 8) {
    const size_t w0 = (size_t)idx[(size_t)b * KK + j] * D;
    float acc = 0.0f;
    for (uint d4 = lane; d4 < D / 4; d4 += 32) {
      const size_t o = w0 + 4 * d4;
      acc += dot(float4(static_cast<float>(W[o]), static_cast<float>(W[o + 1]), static_cast<float>(W[o + 2]),
                        static_cast<float>(W[o + 3])), y[d4]);
    }
    acc = simd_sum(acc);
    if (lane == 0) out[(size_t)b * KK + j] = acc;
  }
"""

LATENT_GRADS = r"""
  // template: F, D, HAS_ENC (LPY / LPX: whether Y / X are bfloat16; the reads convert either);
  // 256 threads = 256 d's, 32 latents per threadgroup
  threadgroup float tile[32][257];
  const int f0 = threadgroup_position_in_grid.x * 32;
  const int d0 = threadgroup_position_in_grid.y * 256;
  const int t = thread_position_in_threadgroup.x;
  const int d = d0 + t;
  for (int l = 0; l < 32; ++l) {
    const int f = f0 + l;
    float accd = 0.0f, acce = 0.0f;
    if (f < F && d < D) {
      for (int q = offsets[f]; q < offsets[f + 1]; ++q) {
        accd += coef_dec[q] * static_cast<float>(Y[(size_t)rows_dec[q] * D + d]);  // Y, X: float or bfloat
        if (HAS_ENC) acce += coef_enc[q] * static_cast<float>(X[(size_t)rows_enc[q] * D + d]);
      }
      dW_dec[(size_t)f * D + d] = accd;
    }
    if (HAS_ENC) tile[l][t] = acce;
  }
  if (HAS_ENC) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int l = t % 32;
    for (int r = 0; r < 32; ++r) {
      const int dd = r * 8 + t / 32;
      if (f0 + l < F && d0 + dd < D) dW_enc[(size_t)(d0 + dd) * F + f0 + l] = tile[l][dd];
    }
    if (threadgroup_position_in_grid.y == 0 && t < 32 && f0 + t < F) {
      float s = 0.0f;
      for (int q = offsets[f0 + t]; q < offsets[f0 + t + 1]; ++q) s += coef_enc[q];
      db_enc[f0 + t] = s;
    }
  }
"""

ADAM_ROWS = r"""
  // template: D, REMOVE_PAR, RENORM, LOWP (also write the new row in bfloat16 into W_lp), VEC (unused: scalar
  // loads); 256 threads; hp = [lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, apply, renorm_eps]
  constexpr int PER = (D + 255) / 256;
  threadgroup float red[8];
  const uint t = thread_position_in_threadgroup.x;
  const size_t base = (size_t)threadgroup_position_in_grid.x * D;
  const float b1 = hp[1], ob1 = hp[2], b2 = hp[3], ob2 = hp[4], eps = hp[5], c1 = hp[6], c2 = hp[7], reps = hp[9];
  const bool apply = hp[8] > 0.5f;
  float w[PER], g[PER];
  float dt = 0.0f;
  for (int i = 0; i < PER; ++i) {
    const uint d = t + i * 256;
    w[i] = 0.0f; g[i] = 0.0f;
    if (d < D) { w[i] = W[base + d]; g[i] = G[base + d]; if (!metal::isfinite(g[i])) g[i] = 0.0f; dt += w[i] * g[i]; }
  }
  if (REMOVE_PAR) {
    dt = simd_sum(dt);
    if (t % 32 == 0) red[t / 32] = dt;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    dt = 0.0f;
    for (int i = 0; i < 8; ++i) dt += red[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = 0; i < PER; ++i) g[i] = g[i] - dt * w[i];
  }
  float nrm = 0.0f;
  for (int i = 0; i < PER; ++i) {
    const uint d = t + i * 256;
    if (d < D) {
      float m = b1 * M[base + d] + ob1 * g[i];
      float v = b2 * V[base + d] + ob2 * (g[i] * g[i]);
      M_out[base + d] = m;
      V_out[base + d] = v;
      float p = w[i] - (c1 * m) / (metal::precise::sqrt(v) * c2 + eps);
      w[i] = p;
      nrm += p * p;
    }
  }
  float den = 1.0f;
  if (RENORM) {
    nrm = simd_sum(nrm);
    if (t % 32 == 0) red[t / 32] = nrm;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    nrm = 0.0f;
    for (int i = 0; i < 8; ++i) nrm += red[i];
    den = apply ? metal::precise::sqrt(nrm) + reps : 1.0f;
  }
  for (int i = 0; i < PER; ++i) {
    const uint d = t + i * 256;
    if (d < D) {
      const float o = RENORM ? w[i] / den : w[i];
      W_out[base + d] = o;
      if (LOWP) W_lp[base + d] = static_cast<bfloat16_t>(o);
    }
  }
"""

SQ_NORMS = r"""
  // template: C (row length), HAS_W; 256 threads per row; out[r] = |g_r|^2 [- (g_r.W_r)^2 (2 - |W_r|^2)]
  threadgroup float red[3][8];
  const uint t = thread_position_in_threadgroup.x;
  const size_t base = (size_t)threadgroup_position_in_grid.x * C;
  float gg = 0.0f, gw = 0.0f, ww = 0.0f;
  for (uint i = t; i < C; i += 256) {
    const float a = G[base + i];
    gg += a * a;
    if (HAS_W) { const float w = W[base + i]; gw += a * w; ww += w * w; }
  }
  gg = simd_sum(gg); gw = simd_sum(gw); ww = simd_sum(ww);
  if (t % 32 == 0) { red[0][t / 32] = gg; red[1][t / 32] = gw; red[2][t / 32] = ww; }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (t == 0) {
    gg = 0.0f; gw = 0.0f; ww = 0.0f;
    for (int i = 0; i < 8; ++i) { gg += red[0][i]; gw += red[1][i]; ww += red[2][i]; }
    out[threadgroup_position_in_grid.x] = HAS_W ? gg - gw * gw * (2.0f - ww) : gg;
  }
"""

SEG_FILL = r"""
  // template: N (entries); the CUDA kernel's (cuda_sources_backward.SEG_FILL) design; fill is atomic, zero-initialised
  const uint e = thread_position_in_grid.x;
  if (e >= N) return;
  const uint f = cols[e];
  const int s = offsets[f] + atomic_fetch_add_explicit(&fill[f], 1, memory_order_relaxed);
  atomic_store_explicit(&slot_e[s], e, memory_order_relaxed);
  atomic_store_explicit(&slot_r[s], rows[e], memory_order_relaxed);
"""

SEG_ORDER = r"""
  // template: N (entries); as cuda_sources_backward.SEG_ORDER
  const uint s = thread_position_in_grid.x;
  if (s >= N) return;
  const uint e = slot_e[s], r = slot_r[s];
  const uint f = cols[e];
  const int a = offsets[f], b = offsets[f + 1];
  int rank = 0;
  for (int t = a; t < b; ++t) {
    const uint r2 = slot_r[t], e2 = slot_e[t];
    rank += (r2 < r) || (r2 == r && e2 < e);
  }
  order[a + rank] = e;
"""
