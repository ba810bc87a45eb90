"""The CUDA kernel sources of ``cuda.py``, backward and optimizer side: the per-latent gradient sums and the sort of
their entries, the decoder's Adam pass, the elementwise Adam and the gradient-norm rows. They use the header of
``cuda_sources.py`` (``HEADER``), which ``cuda.py`` passes to every kernel."""

LATENT_GRADS = r"""
  // template: F, D, HAS_ENC, LPY / LPX (Y / X in bfloat16); block 256 threads = 256 d's, 32 latents per block
  __shared__ float tile[32][257];
  const int f0 = blockIdx.x * 32;
  const int d0 = blockIdx.y * 256;
  const int d = d0 + threadIdx.x;
  for (int l = 0; l < 32; ++l) {
    const int f = f0 + l;
    float accd = 0.f, acce = 0.f;
    if (f < F) {
      const int s = offsets[f], e = offsets[f + 1];
      if (d < D) {
        for (int q = s; q < e; ++q) {
          accd += coef_dec[q] * hk_ld1<LPY>(Y, (size_t)rows_dec[q] * D + d);
          if (HAS_ENC) acce += coef_enc[q] * hk_ld1<LPX>(X, (size_t)rows_enc[q] * D + d);
        }
        dW_dec[(size_t)f * D + d] = accd;
      }
    }
    if (HAS_ENC) tile[l][threadIdx.x] = acce;
  }
  if (HAS_ENC) {
    __syncthreads();
    const int l = threadIdx.x & 31;
    for (int r = 0; r < 32; ++r) {
      const int dd = r * 8 + (threadIdx.x >> 5);
      if (f0 + l < F && d0 + dd < D) dW_enc[(size_t)(d0 + dd) * F + f0 + l] = tile[l][dd];
    }
    if (blockIdx.y == 0 && threadIdx.x < 32 && f0 + threadIdx.x < F) {
      const int f = f0 + threadIdx.x;
      float sacc = 0.f;
      for (int q = offsets[f]; q < offsets[f + 1]; ++q) sacc += coef_enc[q];
      db_enc[f] = sacc;
    }
  }
"""

LATENT_GRADS_V4 = r"""
  // template: F, D (D % 4 == 0), HAS_ENC, TL, LPY / LPX (Y / X in bfloat16); block (64, TY): 64 threads x float4
  // = 256 d's, TL latents per block, TY of them at a time (threadIdx.y), two entries per iteration (independent
  // loads in flight)
  __shared__ float tile[TL][257];
  const int f0 = blockIdx.x * TL;
  const int d0 = blockIdx.y * 256;
  const int t = threadIdx.x;
  const int d = d0 + 4 * t;
  for (int l = threadIdx.y; l < TL; l += blockDim.y) {
    const int f = f0 + l;
    float4 ad = make_float4(0.f, 0.f, 0.f, 0.f), ae = make_float4(0.f, 0.f, 0.f, 0.f);
    if (f < F && d < D) {
      const int s = offsets[f], e = offsets[f + 1];
      int q = s;
      for (; q + 1 < e; q += 2) {
        const float c0 = coef_dec[q], c1 = coef_dec[q + 1];
        const float4 y0 = hk_ld4<LPY>(Y, (size_t)rows_dec[q] * D + d);
        const float4 y1 = hk_ld4<LPY>(Y, (size_t)rows_dec[q + 1] * D + d);
        ad.x += c0 * y0.x; ad.y += c0 * y0.y; ad.z += c0 * y0.z; ad.w += c0 * y0.w;
        ad.x += c1 * y1.x; ad.y += c1 * y1.y; ad.z += c1 * y1.z; ad.w += c1 * y1.w;
        if (HAS_ENC) {
          const float e0 = coef_enc[q], e1 = coef_enc[q + 1];
          const float4 x0 = hk_ld4<LPX>(X, (size_t)rows_enc[q] * D + d);
          const float4 x1 = hk_ld4<LPX>(X, (size_t)rows_enc[q + 1] * D + d);
          ae.x += e0 * x0.x; ae.y += e0 * x0.y; ae.z += e0 * x0.z; ae.w += e0 * x0.w;
          ae.x += e1 * x1.x; ae.y += e1 * x1.y; ae.z += e1 * x1.z; ae.w += e1 * x1.w;
        }
      }
      if (q < e) {
        const float c0 = coef_dec[q];
        const float4 y0 = hk_ld4<LPY>(Y, (size_t)rows_dec[q] * D + d);
        ad.x += c0 * y0.x; ad.y += c0 * y0.y; ad.z += c0 * y0.z; ad.w += c0 * y0.w;
        if (HAS_ENC) {
          const float e0 = coef_enc[q];
          const float4 x0 = hk_ld4<LPX>(X, (size_t)rows_enc[q] * D + d);
          ae.x += e0 * x0.x; ae.y += e0 * x0.y; ae.z += e0 * x0.z; ae.w += e0 * x0.w;
        }
      }
      *reinterpret_cast<float4*>(dW_dec + (size_t)f * D + d) = ad;
    }
    if (HAS_ENC) { tile[l][4 * t] = ae.x; tile[l][4 * t + 1] = ae.y; tile[l][4 * t + 2] = ae.z; tile[l][4 * t + 3] = ae.w; }
  }
  if (HAS_ENC) {
    __syncthreads();
    const int t2 = threadIdx.y * 64 + t, nt2 = 64 * blockDim.y;
    const int l = t2 % TL;
    for (int dd = t2 / TL; dd < 256; dd += nt2 / TL) {
      if (f0 + l < F && d0 + dd < D) dW_enc[(size_t)(d0 + dd) * F + f0 + l] = tile[l][dd];
    }
    if (blockIdx.y == 0 && t2 < TL && f0 + t2 < F) {
      const int f = f0 + t2;
      float sacc = 0.f;
      for (int q = offsets[f]; q < offsets[f + 1]; ++q) sacc += coef_enc[q];
      db_enc[f] = sacc;
    }
  }
"""

LATENT_GRADS_ATOMIC = r"""
  // template: F, D, HAS_ENC; one block per entry, threads over d; outputs zero-initialised
  const int q = blockIdx.x;
  const size_t col = cols[q];
  const float cd = coef_dec[q];
  const float ce = HAS_ENC ? coef_enc[q] : 0.f;
  const float* y = Y + (size_t)rows_dec[q] * D;
  const float* x = X + (size_t)rows_enc[q] * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if (cd != 0.f) atomicAdd(&dW_dec[col * D + d], cd * y[d]);
    if (HAS_ENC && ce != 0.f) atomicAdd(&dW_enc[(size_t)d * F + col], ce * x[d]);
  }
  if (HAS_ENC && threadIdx.x == 0 && ce != 0.f) atomicAdd(&db_enc[col], ce);
"""

SEG_FILL = r"""
  // template: N (entries); entry e into a slot of its latent's segment (offsets[col]:offsets[col+1]), in arrival
  // order (fill: per-latent counters, zero-initialised); its row beside it
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= N) return;
  const unsigned int f = cols[e];
  const int s = offsets[f] + atomicAdd(&fill[f], 1);
  slot_e[s] = (unsigned int)e;
  slot_r[s] = rows[e];
"""

SEG_ORDER = r"""
  // template: N (entries); the entry in slot s to its rank within its latent's segment by (row, entry index):
  // order = the entries sorted by (latent, row, entry), whatever order SEG_FILL's atomics gave
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s >= N) return;
  const unsigned int e = slot_e[s], r = slot_r[s];
  const unsigned int f = cols[e];
  const int a = offsets[f], b = offsets[f + 1];
  int rank = 0;
  for (int t = a; t < b; ++t) {
    const unsigned int r2 = slot_r[t], e2 = slot_e[t];
    rank += (r2 < r) || (r2 == r && e2 < e);
  }
  order[a + rank] = e;
"""

ADAM_ROWS = r"""
  // template: D, REMOVE_PAR, RENORM, LOWP (also write the new row rounded to bfloat16 into W_lp), VEC (4: float4
  // loads and stores, D % 4 == 0; 1: scalars); 256 threads; hp = [lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, apply,
  // renorm_eps]
  constexpr int NC = D / VEC;
  constexpr int PER = (NC + 255) / 256;
  __shared__ float red[33];
  const size_t base = (size_t)blockIdx.x * D;
  const float b1 = hp[1], ob1 = hp[2], b2 = hp[3], ob2 = hp[4], eps = hp[5], c1 = hp[6], c2 = hp[7], reps = hp[9];
  const bool apply = hp[8] > 0.5f;
  float w[PER * VEC], g[PER * VEC];
  float dot = 0.f;
  #pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * 256;
    #pragma unroll
    for (int j = 0; j < VEC; ++j) { w[i * VEC + j] = 0.f; g[i * VEC + j] = 0.f; }
    if (c < NC) {
      hk_ldv<VEC>(W, base + (size_t)c * VEC, w + i * VEC);
      hk_ldv<VEC>(G, base + (size_t)c * VEC, g + i * VEC);
      #pragma unroll
      for (int j = 0; j < VEC; ++j) {
        if (!isfinite(g[i * VEC + j])) g[i * VEC + j] = 0.f;
        dot += w[i * VEC + j] * g[i * VEC + j];
      }
    }
  }
  if (REMOVE_PAR) {
    dot = hk_block_sum(dot, red);
    #pragma unroll
    for (int i = 0; i < PER * VEC; ++i) g[i] = g[i] - dot * w[i];
  }
  float nrm = 0.f;
  #pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * 256;
    if (c < NC) {
      const size_t o = base + (size_t)c * VEC;
      float mm[VEC], vv[VEC];
      hk_ldv<VEC>(M, o, mm);
      hk_ldv<VEC>(V, o, vv);
      #pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gj = g[i * VEC + j];
        mm[j] = b1 * mm[j] + ob1 * gj;
        vv[j] = b2 * vv[j] + ob2 * (gj * gj);
        const float p = w[i * VEC + j] - (c1 * mm[j]) / (sqrtf(vv[j]) * c2 + eps);
        w[i * VEC + j] = p;
        nrm += p * p;
      }
      hk_stv<VEC>(M_out, o, mm);
      hk_stv<VEC>(V_out, o, vv);
    }
  }
  float den = 1.f;
  if (RENORM) { nrm = hk_block_sum(nrm, red); den = apply ? sqrtf(nrm) + reps : 1.f; }
  #pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = threadIdx.x + i * 256;
    if (c < NC) {
      const size_t o = base + (size_t)c * VEC;
      float out[VEC];
      #pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = RENORM ? w[i * VEC + j] / den : w[i * VEC + j];
      hk_stv<VEC>(W_out, o, out);
      if (LOWP) hk_stbf<VEC>(W_lp, o, out);
    }
  }
"""

ADAM = r"""
  // template: N (elements, N % 4 == 0), LOWP (also write the new p rounded to bfloat16 into P_lp); one float4 per
  // thread; hp = [lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, apply]; non-finite gradient entries read as 0
  const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (i >= N) return;
  const float b1 = hp[1], ob1 = hp[2], b2 = hp[3], ob2 = hp[4], eps = hp[5], c1 = hp[6], c2 = hp[7];
  float p[4], g[4], m[4], v[4];
  hk_ldv<4>(P, i, p);
  hk_ldv<4>(G, i, g);
  hk_ldv<4>(M, i, m);
  hk_ldv<4>(V, i, v);
  #pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float gj = isfinite(g[j]) ? g[j] : 0.f;
    m[j] = b1 * m[j] + ob1 * gj;
    v[j] = b2 * v[j] + ob2 * (gj * gj);
    p[j] = p[j] - (c1 * m[j]) / (sqrtf(v[j]) * c2 + eps);
  }
  hk_stv<4>(P_out, i, p);
  hk_stv<4>(M_out, i, m);
  hk_stv<4>(V_out, i, v);
  if (LOWP) hk_stbf<4>(P_lp, i, p);
"""

SQ_NORMS = r"""
  // template: C (row length), HAS_W; one 256-thread block per row; out[r] = |g_r|^2 [- (g_r.W_r)^2 (2 - |W_r|^2)]
  __shared__ float red[33];
  const size_t base = (size_t)blockIdx.x * C;
  float gg = 0.f, gw = 0.f, ww = 0.f;
  if (C % 4 == 0) {
    for (int i = 4 * threadIdx.x; i < C; i += 1024) {
      const float4 a = *reinterpret_cast<const float4*>(G + base + i);
      gg += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
      if (HAS_W) {
        const float4 w = *reinterpret_cast<const float4*>(W + base + i);
        gw += a.x * w.x + a.y * w.y + a.z * w.z + a.w * w.w;
        ww += w.x * w.x + w.y * w.y + w.z * w.z + w.w * w.w;
      }
    }
  } else {
    for (int i = threadIdx.x; i < C; i += 256) {
      const float a = G[base + i];
      gg += a * a;
      if (HAS_W) { const float w = W[base + i]; gw += a * w; ww += w * w; }
    }
  }
  gg = hk_block_sum(gg, red);
  if (HAS_W) { gw = hk_block_sum(gw, red); ww = hk_block_sum(ww, red); }
  if (threadIdx.x == 0) out[blockIdx.x] = HAS_W ? gg - gw * gw * (2.f - ww) : gg;
"""
