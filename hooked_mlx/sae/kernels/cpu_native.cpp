// Native CPU primitives of the SAE ops (``cpu_native.py`` builds this file at first use and loads it).
//
// Each function builds an MLX array whose primitive runs a multi-threaded (OpenMP) loop on the CPU stream,
// so the trainer's compiled step keeps its graph: these are ordinary nodes in it. The contracts are those of
// ``ReferenceOps`` in ops.py (same arguments, same results to float32 rounding); the self-check in select.py
// compares every one with it before the back end is used. float32 operands, row-contiguous (the Python side
// makes them so); integer indices are uint32.
//
// Determinism: every sum is taken in a fixed order that does not depend on the thread count (per-latent
// sums walk a latent's entries in their input order; reductions combine per-row partials in row order).

#include <nanobind/nanobind.h>
#include <nanobind/stl/tuple.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace nb = nanobind;
namespace mx = mlx::core;
using mx::array;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------
// small vector helpers (independent accumulators, so that the compiler vectorises without -ffast-math)
// ---------------------------------------------------------------------------------------------------

inline float dot(const float* a, const float* b, int n) {
  float acc[16] = {0};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline double sq_sum(const float* a, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * a[i + l];
  double s = 0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; i < n; ++i) s += double(a[i]) * a[i];
  return s;
}

inline void axpy(float* y, const float* x, float a, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float finite_or_zero(float g) { return std::fabs(g) < kInf ? g : 0.0f; }

struct Hp {  // adam_hparams: [lr, b1, 1-b1, b2, 1-b2, eps, c1, c2, apply]
  float b1, ob1, b2, ob2, eps, c1, c2, on;
  explicit Hp(const float* h)
      : b1(h[1]), ob1(h[2]), b2(h[3]), ob2(h[4]), eps(h[5]), c1(h[6]), c2(h[7]), on(h[8]) {}
};

// the reference's formula, element by element (ops._adam_math)
inline void adam_span(const float* p, const float* g, const float* m, const float* v, float* po, float* mo,
                      float* vo, int64_t n, const Hp& h) {
  for (int64_t i = 0; i < n; ++i) {
    float gi = finite_or_zero(g[i]);
    float mi = h.b1 * m[i] + h.ob1 * gi;
    float vi = h.b2 * v[i] + h.ob2 * (gi * gi);
    po[i] = p[i] - (h.c1 * mi) / (std::sqrt(vi) * h.c2 + h.eps);
    mo[i] = mi;
    vo[i] = vi;
  }
}

// ---------------------------------------------------------------------------------------------------
// primitive plumbing
// ---------------------------------------------------------------------------------------------------

class NativePrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error(std::string("hooked_mlx native CPU kernel '") + name() +
                             "' was asked to run on a GPU stream; it runs on the CPU only.");
  }
};

void alloc(array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

// output `out` reuses `in`'s buffer when MLX may donate it (nobody else holds it), else a new buffer
void alloc_or_donate(array& out, const array& in) {
  if (in.is_donatable() && in.nbytes() == out.nbytes() && in.flags().row_contiguous)
    out.copy_shared_buffer(in);
  else
    alloc(out);
}

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

array f32(const array& a) {
  auto s = cpu_stream();
  return mx::contiguous(mx::astype(a, mx::float32, s), false, s);
}

array u32(const array& a) {
  auto s = cpu_stream();
  return mx::contiguous(mx::astype(a, mx::uint32, s), false, s);
}

template <class F>
void dispatch(mx::Stream s, F&& f) {
  mx::cpu::get_command_encoder(s).dispatch(std::forward<F>(f));
}

// ---------------------------------------------------------------------------------------------------
// row top-k: vals [B,k] (relu'd, or raw with non-finite -> 0), idx [B,k] uint32, any order
// ---------------------------------------------------------------------------------------------------

class RowTopK : public NativePrimitive {
 public:
  RowTopK(mx::Stream s, int k, bool has_dead, bool relu)
      : NativePrimitive(s), k_(k), has_dead_(has_dead), relu_(relu) {}
  const char* name() const override { return "HookedMlxRowTopK"; }

  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    const array& pre = in[0];
    const int B = pre.shape(0), F = pre.shape(1), k = k_;
    alloc(out[0]);
    alloc(out[1]);
    const float* p = pre.data<float>();
    const bool* dead = has_dead_ ? in[1].data<bool>() : nullptr;
    float* vals = out[0].data<float>();
    uint32_t* idx = out[1].data<uint32_t>();
    const bool relu = relu_;
    dispatch(stream(), [=]() {
#pragma omp parallel
      {
        std::vector<float> bv(k);
        std::vector<uint32_t> bi(k);
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) {
          const float* row = p + int64_t(b) * F;
          auto at = [&](int j) { return (dead && !dead[j]) ? -kInf : row[j]; };
          for (int j = 0; j < k; ++j) {
            bv[j] = at(j);
            bi[j] = uint32_t(j);
          }
          int lo = int(std::min_element(bv.begin(), bv.end()) - bv.begin());
          float thr = bv[lo];
          auto take = [&](int j) {
            float x = at(j);
            if (x > thr) {
              bv[lo] = x;
              bi[lo] = uint32_t(j);
              lo = int(std::min_element(bv.begin(), bv.end()) - bv.begin());
              thr = bv[lo];
            }
          };
          int j = k;
          if (!dead) {  // blocks of 16 whose maximum (vectorised) does not beat the threshold are skipped
            for (; j < F && (j & 15); ++j) take(j);
            for (; j + 16 <= F; j += 16) {
              float mx16 = row[j];
              for (int l = 1; l < 16; ++l) mx16 = std::max(mx16, row[j + l]);
              if (mx16 > thr || mx16 != mx16)
                for (int l = 0; l < 16; ++l) take(j + l);
            }
          }
          for (; j < F; ++j) take(j);
          float* vo = vals + int64_t(b) * k;
          uint32_t* io = idx + int64_t(b) * k;
          for (int j = 0; j < k; ++j) {
            float x = bv[j];
            vo[j] = relu ? std::max(x, 0.0f) : (std::fabs(x) < kInf ? x : 0.0f);
            io[j] = bi[j];
          }
        }
      }
    });
  }

 private:
  int k_;
  bool has_dead_, relu_;
};

// ---------------------------------------------------------------------------------------------------
// decode: out [B,D] = sum_j vals[b,j] W[idx[b,j]];  gather_dot: out [B,k] = dY_b . W[idx[b,j]]
// ---------------------------------------------------------------------------------------------------

class Decode : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "HookedMlxSparseDecode"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    const int B = in[0].shape(0), k = in[0].shape(1), D = in[2].shape(1);
    const uint32_t F = uint32_t(in[2].shape(0));
    alloc(out[0]);
    const float* vals = in[0].data<float>();
    const uint32_t* idx = in[1].data<uint32_t>();
    const float* W = in[2].data<float>();
    float* o = out[0].data<float>();
    dispatch(stream(), [=]() {
#pragma omp parallel for schedule(static)
      for (int b = 0; b < B; ++b) {
        float* y = o + int64_t(b) * D;
        std::fill(y, y + D, 0.0f);
        for (int j = 0; j < k; ++j) {
          const uint32_t f = idx[int64_t(b) * k + j];
          if (f < F) axpy(y, W + int64_t(f) * D, vals[int64_t(b) * k + j], D);  // (an index out of range adds nothing)
        }
      }
    });
  }
};

class GatherDot : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "HookedMlxGatherDot"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    const int B = in[1].shape(0), k = in[1].shape(1), D = in[2].shape(1);
    const uint32_t F = uint32_t(in[2].shape(0));
    alloc(out[0]);
    const float* dY = in[0].data<float>();
    const uint32_t* idx = in[1].data<uint32_t>();
    const float* W = in[2].data<float>();
    float* o = out[0].data<float>();
    dispatch(stream(), [=]() {
#pragma omp parallel for schedule(static)
      for (int b = 0; b < B; ++b)
        for (int j = 0; j < k; ++j) {
          const uint32_t f = idx[int64_t(b) * k + j];
          o[int64_t(b) * k + j] = f < F ? dot(dY + int64_t(b) * D, W + int64_t(f) * D, D) : 0.0f;
        }
    });
  }
};

// ---------------------------------------------------------------------------------------------------
// per-latent gradient sums over the kept entries e = (row, col):
//   dW_dec [F,D] row c = sum_e coef_dec_e Y[rows_dec_e];  dW_enc [D,F] column c = sum_e coef_enc_e xc[rows_enc_e];
//   db_enc [F] = sum_e coef_enc_e.  Entries are grouped by column (a stable counting sort) and each latent's
//   entries summed in input order; latents are split among threads in blocks of 64, the encoder block is
//   built as rows [64, D] and written transposed, so every output element is written once.
// ---------------------------------------------------------------------------------------------------

class LatentGrads : public NativePrimitive {
 public:
  LatentGrads(mx::Stream s, int F, bool has_enc) : NativePrimitive(s), F_(F), has_enc_(has_enc) {}
  const char* name() const override { return "HookedMlxLatentGrads"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    // in: cols, rows_dec, coef_dec, Y [, rows_enc, coef_enc, xc]
    const int64_t n = in[0].size();
    const int F = F_, D = in[3].shape(1);
    const uint32_t n_dec = uint32_t(in[3].shape(0)), n_enc = has_enc_ ? uint32_t(in[6].shape(0)) : 0u;
    for (auto& o : out) alloc(o);
    const uint32_t* cols = in[0].data<uint32_t>();
    const uint32_t* rdec = in[1].data<uint32_t>();
    const float* cdec = in[2].data<float>();
    const float* Y = in[3].data<float>();
    const bool enc = has_enc_;
    const uint32_t* renc = enc ? in[4].data<uint32_t>() : nullptr;
    const float* cenc = enc ? in[5].data<float>() : nullptr;
    const float* X = enc ? in[6].data<float>() : nullptr;
    float* gdec = out[0].data<float>();
    float* genc = enc ? out[1].data<float>() : nullptr;
    float* gb = enc ? out[2].data<float>() : nullptr;
    dispatch(stream(), [=]() {
      // an entry whose latent or row is out of range is left out (it would address memory outside the arrays)
      auto valid = [&](int64_t e) {
        return cols[e] < uint32_t(F) && rdec[e] < n_dec && (!enc || renc[e] < n_enc);
      };
      std::vector<int64_t> start(F + 1, 0);
      for (int64_t e = 0; e < n; ++e)
        if (valid(e)) start[cols[e] + 1]++;
      for (int c = 0; c < F; ++c) start[c + 1] += start[c];
      std::vector<int64_t> order(n);
      {
        std::vector<int64_t> pos(start.begin(), start.end() - 1);
        for (int64_t e = 0; e < n; ++e)
          if (valid(e)) order[pos[cols[e]]++] = e;
      }
      constexpr int BLK = 64;
      const int nblk = (F + BLK - 1) / BLK;
#pragma omp parallel
      {
        std::vector<float> tile(enc ? size_t(BLK) * D : 0);
#pragma omp for schedule(static)
        for (int blk = 0; blk < nblk; ++blk) {
          const int c0 = blk * BLK, c1 = std::min(F, c0 + BLK);
          for (int c = c0; c < c1; ++c) {
            float* row = gdec + int64_t(c) * D;
            std::fill(row, row + D, 0.0f);
            for (int64_t q = start[c]; q < start[c + 1]; ++q) {
              const int64_t e = order[q];
              axpy(row, Y + int64_t(rdec[e]) * D, cdec[e], D);
            }
          }
          if (!enc) continue;
          for (int c = c0; c < c1; ++c) {
            float* row = tile.data() + int64_t(c - c0) * D;
            std::fill(row, row + D, 0.0f);
            float sb = 0.0f;
            for (int64_t q = start[c]; q < start[c + 1]; ++q) {
              const int64_t e = order[q];
              axpy(row, X + int64_t(renc[e]) * D, cenc[e], D);
              sb += cenc[e];
            }
            gb[c] = sb;
          }
          for (int d = 0; d < D; ++d) {
            float* dst = genc + int64_t(d) * F;
            for (int c = c0; c < c1; ++c) dst[c] = tile[int64_t(c - c0) * D + d];
          }
        }
      }
    });
  }

 private:
  int F_;
  bool has_enc_;
};

// ---------------------------------------------------------------------------------------------------
// BatchTopK entries: the n_keep largest relu(pre) over the flattened batch, as (rows, cols, vals) in row-major
// order. The cut θ comes from a two-stage selection (the n_keep best blocks of 32 by their maximum hold the
// n_keep largest entries, then nth_element over those blocks' entries); then every entry > θ and, in row-major
// order, as many entries == θ as fill n_keep. entries_dot: out[e] = dY[rows_e] . W[cols_e]
// ---------------------------------------------------------------------------------------------------

class BatchEntries : public NativePrimitive {
 public:
  BatchEntries(mx::Stream s, int64_t n_keep) : NativePrimitive(s), n_keep_(n_keep) {}
  const char* name() const override { return "HookedMlxBatchEntries"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    const int B = in[0].shape(0), F = in[0].shape(1);
    for (auto& o : out) alloc(o);
    const float* p = in[0].data<float>();
    uint32_t* rows = out[0].data<uint32_t>();
    uint32_t* cols = out[1].data<uint32_t>();
    float* vals = out[2].data<float>();
    const int64_t n_keep = n_keep_;
    dispatch(stream(), [=]() {
      const int64_t N = int64_t(B) * F;
      auto act = [&](int64_t i) { return p[i] > 0.0f ? p[i] : 0.0f; };  // relu; NaN reads 0
      constexpr int64_t G = 32;
      const int64_t nb = (N + G - 1) / G;
      std::vector<float> bm(nb);
#pragma omp parallel for schedule(static)
      for (int64_t b = 0; b < nb; ++b) {
        float m = 0.0f;
        for (int64_t i = b * G; i < std::min(N, b * G + G); ++i) m = std::max(m, act(i));
        bm[b] = m;
      }
      float tb = 0.0f;  // the n_keep-th largest block maximum (0: every block is a candidate)
      if (n_keep < nb) {
        std::vector<float> t(bm);
        std::nth_element(t.begin(), t.begin() + (n_keep - 1), t.end(), std::greater<float>());
        tb = t[n_keep - 1];
      }
      std::vector<float> cand;
      for (int64_t b = 0; b < nb; ++b)
        if (bm[b] >= tb)
          for (int64_t i = b * G; i < std::min(N, b * G + G); ++i) cand.push_back(act(i));
      std::nth_element(cand.begin(), cand.begin() + (n_keep - 1), cand.end(), std::greater<float>());
      const float theta = cand[n_keep - 1];
      std::vector<int64_t> gt(B), eq(B);
#pragma omp parallel for schedule(static)
      for (int b = 0; b < B; ++b) {
        int64_t g = 0, e = 0;
        for (int f = 0; f < F; ++f) {
          const float v = act(int64_t(b) * F + f);
          g += v > theta;
          e += v == theta;
        }
        gt[b] = g;
        eq[b] = e;
      }
      std::vector<int64_t> off(B + 1, 0), take(B);
      int64_t n_gt = 0;
      for (int b = 0; b < B; ++b) n_gt += gt[b];
      int64_t rem = n_keep - n_gt;
      for (int b = 0; b < B; ++b) {
        take[b] = std::min(eq[b], std::max<int64_t>(rem, 0));
        rem -= take[b];
        off[b + 1] = off[b] + gt[b] + take[b];
      }
#pragma omp parallel for schedule(static)
      for (int b = 0; b < B; ++b) {
        int64_t o = off[b], t = take[b];
        for (int f = 0; f < F; ++f) {
          const float v = act(int64_t(b) * F + f);
          if (v > theta || (v == theta && t-- > 0)) {
            rows[o] = uint32_t(b);
            cols[o] = uint32_t(f);
            vals[o] = v;
            ++o;
          }
        }
      }
      for (int64_t o = off[B]; o < n_keep; ++o) {  // (only if fewer were found: nothing adds from these)
        rows[o] = 0;
        cols[o] = 0;
        vals[o] = 0.0f;
      }
    });
  }

 private:
  int64_t n_keep_;
};

class EntriesDot : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "HookedMlxEntriesDot"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    // in: dY [R, D], rows [n], cols [n], W [F, D]
    const int64_t n = in[1].size();
    const int D = in[0].shape(1);
    const uint32_t R = uint32_t(in[0].shape(0)), F = uint32_t(in[3].shape(0));
    alloc(out[0]);
    const float* dY = in[0].data<float>();
    const uint32_t* rows = in[1].data<uint32_t>();
    const uint32_t* cols = in[2].data<uint32_t>();
    const float* W = in[3].data<float>();
    float* o = out[0].data<float>();
    dispatch(stream(), [=]() {
#pragma omp parallel for schedule(static)
      for (int64_t e = 0; e < n; ++e)
        o[e] = (rows[e] < R && cols[e] < F) ? dot(dY + int64_t(rows[e]) * D, W + int64_t(cols[e]) * D, D) : 0.0f;
    });
  }
};

// ---------------------------------------------------------------------------------------------------
// Adam (elementwise) and the decoder's row pass (parallel-gradient removal, Adam, renorm)
// ---------------------------------------------------------------------------------------------------

class Adam : public NativePrimitive {
 public:
  using NativePrimitive::NativePrimitive;
  const char* name() const override { return "HookedMlxAdam"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    // in: p, g, m, v, hp
    alloc_or_donate(out[0], in[0]);
    alloc_or_donate(out[1], in[2]);
    alloc_or_donate(out[2], in[3]);
    const int64_t n = in[0].size();
    const float *p = in[0].data<float>(), *g = in[1].data<float>(), *m = in[2].data<float>(),
                *v = in[3].data<float>(), *hp = in[4].data<float>();
    float *po = out[0].data<float>(), *mo = out[1].data<float>(), *vo = out[2].data<float>();
    dispatch(stream(), [=]() {
      const Hp h(hp);
      constexpr int64_t CH = 1 << 14;
      const int64_t nch = (n + CH - 1) / CH;
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t a = c * CH, len = std::min(CH, n - a);
        adam_span(p + a, g + a, m + a, v + a, po + a, mo + a, vo + a, len, h);
      }
    });
  }
};

class AdamRows : public NativePrimitive {
 public:
  AdamRows(mx::Stream s, bool remove_parallel, bool renorm, float renorm_eps)
      : NativePrimitive(s), remove_parallel_(remove_parallel), renorm_(renorm), eps_(renorm_eps) {}
  const char* name() const override { return "HookedMlxAdamRows"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    alloc_or_donate(out[0], in[0]);
    alloc_or_donate(out[1], in[2]);
    alloc_or_donate(out[2], in[3]);
    const int R = in[0].shape(0), C = in[0].shape(1);
    const float *W = in[0].data<float>(), *g = in[1].data<float>(), *m = in[2].data<float>(),
                *v = in[3].data<float>(), *hp = in[4].data<float>();
    float *Wo = out[0].data<float>(), *mo = out[1].data<float>(), *vo = out[2].data<float>();
    const bool rp = remove_parallel_, rn = renorm_;
    const float reps = eps_;
    dispatch(stream(), [=]() {
      const Hp h(hp);
#pragma omp parallel
      {
        std::vector<float> gr(C);
#pragma omp for schedule(static)
        for (int r = 0; r < R; ++r) {
          const int64_t o = int64_t(r) * C;
          for (int i = 0; i < C; ++i) gr[i] = finite_or_zero(g[o + i]);
          if (rp) {
            const float gw = dot(gr.data(), W + o, C);
            for (int i = 0; i < C; ++i) gr[i] -= gw * W[o + i];
          }
          adam_span(W + o, gr.data(), m + o, v + o, Wo + o, mo + o, vo + o, C, h);
          if (rn && h.on > 0) {
            const float inv = 1.0f / (float(std::sqrt(sq_sum(Wo + o, C))) + reps);
            for (int i = 0; i < C; ++i) Wo[o + i] *= inv;
          }
        }
      }
    });
  }

 private:
  bool remove_parallel_, renorm_;
  float eps_;
};

// ---------------------------------------------------------------------------------------------------
// squared norm: sum g^2, or with W (rows): sum_r |g_r|^2 - (g_r.W_r)^2 (2 - |W_r|^2)
// ---------------------------------------------------------------------------------------------------

class SqNorm : public NativePrimitive {
 public:
  SqNorm(mx::Stream s, bool has_w) : NativePrimitive(s), has_w_(has_w) {}
  const char* name() const override { return "HookedMlxSqNorm"; }
  void eval_cpu(const std::vector<array>& in, std::vector<array>& out) override {
    alloc(out[0]);
    const int64_t R = in[0].ndim() == 2 ? in[0].shape(0) : 1;
    const int64_t C = in[0].size() / std::max<int64_t>(R, 1);
    const float* g = in[0].data<float>();
    const float* W = has_w_ ? in[1].data<float>() : nullptr;
    float* o = out[0].data<float>();
    dispatch(stream(), [=]() {
      // fixed chunks (rows, or 4096 entries of a vector), partials summed in chunk order
      const bool by_rows = R > 1 || W != nullptr;
      const int64_t CH = by_rows ? C : 4096;
      const int64_t nch = by_rows ? R : (C + CH - 1) / CH;
      std::vector<double> part(std::max<int64_t>(nch, 1), 0.0);
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < nch; ++c) {
        const int64_t a = c * CH, len = std::min(CH, R * C - a);
        double s = sq_sum(g + a, len);
        if (W) {
          const double gw = dot(g + a, W + a, int(len));
          s -= gw * gw * (2.0 - sq_sum(W + a, len));
        }
        part[c] = s;
      }
      double t = 0;
      for (double x : part) t += x;
      o[0] = float(t);
    });
  }

 private:
  bool has_w_;
};

// ---------------------------------------------------------------------------------------------------
// graph builders (what Python calls)
// ---------------------------------------------------------------------------------------------------

std::tuple<array, array> row_topk(const array& pre, int k, const array& dead, bool has_dead, bool relu) {
  auto s = cpu_stream();
  std::vector<array> ins{f32(pre)};
  if (has_dead) ins.push_back(mx::contiguous(mx::astype(dead, mx::bool_, s), false, s));
  const int B = pre.shape(0);
  auto outs = array::make_arrays({{B, k}, {B, k}}, {mx::float32, mx::uint32},
                                 std::make_shared<RowTopK>(s, k, has_dead, relu), ins);
  return {outs[0], outs[1]};
}

array decode(const array& vals, const array& idx, const array& W) {
  auto s = cpu_stream();
  return array({vals.shape(0), W.shape(1)}, mx::float32, std::make_shared<Decode>(s),
               {f32(vals), u32(idx), f32(W)});
}

array gather_dot(const array& dY, const array& idx, const array& W) {
  auto s = cpu_stream();
  return array({idx.shape(0), idx.shape(1)}, mx::float32, std::make_shared<GatherDot>(s),
               {f32(dY), u32(idx), f32(W)});
}

std::tuple<array, array, array> latent_grads(const array& cols, const array& rows_dec, const array& coef_dec,
                                             const array& Y, const array& rows_enc, const array& coef_enc,
                                             const array& xc, int F, bool has_enc) {
  auto s = cpu_stream();
  const int D = Y.shape(1);
  std::vector<array> ins{u32(mx::flatten(cols, s)), u32(mx::flatten(rows_dec, s)),
                         f32(mx::flatten(coef_dec, s)), f32(Y)};
  std::vector<mx::Shape> shapes{{F, D}};
  std::vector<mx::Dtype> types{mx::float32};
  if (has_enc) {
    ins.push_back(u32(mx::flatten(rows_enc, s)));
    ins.push_back(f32(mx::flatten(coef_enc, s)));
    ins.push_back(f32(xc));
    shapes.push_back({D, F});
    shapes.push_back({F});
    types.push_back(mx::float32);
    types.push_back(mx::float32);
  }
  auto outs = array::make_arrays(shapes, types, std::make_shared<LatentGrads>(s, F, has_enc), ins);
  if (!has_enc) return {outs[0], outs[0], outs[0]};
  return {outs[0], outs[1], outs[2]};
}

std::tuple<array, array, array> adam(const array& p, const array& g, const array& m, const array& v,
                                     const array& hp) {
  auto s = cpu_stream();
  auto outs = array::make_arrays({p.shape(), p.shape(), p.shape()}, {mx::float32, mx::float32, mx::float32},
                                 std::make_shared<Adam>(s), {f32(p), f32(g), f32(m), f32(v), f32(hp)});
  return {outs[0], outs[1], outs[2]};
}

std::tuple<array, array, array> adam_rows(const array& W, const array& g, const array& m, const array& v,
                                          const array& hp, bool remove_parallel, bool renorm,
                                          float renorm_eps) {
  auto s = cpu_stream();
  auto outs = array::make_arrays({W.shape(), W.shape(), W.shape()}, {mx::float32, mx::float32, mx::float32},
                                 std::make_shared<AdamRows>(s, remove_parallel, renorm, renorm_eps),
                                 {f32(W), f32(g), f32(m), f32(v), f32(hp)});
  return {outs[0], outs[1], outs[2]};
}

std::tuple<array, array, array> batch_entries(const array& pre, int64_t n_keep) {
  auto s = cpu_stream();
  auto outs = array::make_arrays({{int(n_keep)}, {int(n_keep)}, {int(n_keep)}}, {mx::uint32, mx::uint32, mx::float32},
                                 std::make_shared<BatchEntries>(s, n_keep), {f32(pre)});
  return {outs[0], outs[1], outs[2]};
}

array entries_dot(const array& dY, const array& rows, const array& cols, const array& W) {
  auto s = cpu_stream();
  return array({int(rows.size())}, mx::float32, std::make_shared<EntriesDot>(s),
               {f32(dY), u32(mx::flatten(rows, s)), u32(mx::flatten(cols, s)), f32(W)});
}

array sq_norm(const array& g, const array& W, bool has_w) {
  auto s = cpu_stream();
  std::vector<array> ins{f32(g)};
  if (has_w) ins.push_back(f32(W));
  return array(mx::Shape{}, mx::float32, std::make_shared<SqNorm>(s, has_w), ins);
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

NB_MODULE(_hooked_mlx_cpu_kernels, m) {
  nb::module_::import_("mlx.core");
  m.def("row_topk", &row_topk);
  m.def("decode", &decode);
  m.def("gather_dot", &gather_dot);
  m.def("latent_grads", &latent_grads);
  m.def("adam", &adam);
  m.def("adam_rows", &adam_rows);
  m.def("sq_norm", &sq_norm);
  m.def("batch_entries", &batch_entries);
  m.def("entries_dot", &entries_dot);
  m.def("num_threads", &num_threads);
}
