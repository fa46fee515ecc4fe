// Backward pass through the LLaMA-family decoder (include/nuq/llama_grad.hpp, docs/sensitivity.md).
//
// One templated engine serves both precisions: T = float runs every product through the decoder's
// AVX-512/AVX2 tiles (dense_ops.hpp) on the thread pool; T = double runs them through Eigen, single-
// threaded, as the reference that finite differences can check. Every product is written as C = A·Bᵀ
// with both operands contiguous along the reduction (the tiles' layout), so the backward products
// dX = dY·W and dW = dYᵀ·X first transpose one operand: O(size) work against O(size·n) for the product.
#include "nuq/llama_grad.hpp"

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "cpu/thread_pool.hpp"
#include "dense_ops.hpp"
#include "nuq/error.hpp"
#include "nuq/sensitivity.hpp"

namespace nuq {

const char* to_string(LlamaLinearKind kind) {
  static constexpr const char* names[] = {"q", "k", "v", "o", "gate", "up", "down"};
  return names[int(kind)];
}

namespace {

constexpr int kQ = 0, kK = 1, kV = 2, kO = 3, kGate = 4, kUp = 5, kDown = 6;

// Weights as T pointers: the caller's fp32 arrays (T = float) or converted copies (T = double).
template <class T>
struct Net {
  LlamaConfig c;
  const T* embedding = nullptr;
  const T* classifier = nullptr;
  const T* final_norm = nullptr;
  struct Block {
    const T* attn_norm = nullptr;
    const T* ffn_norm = nullptr;
    std::array<const T*, kLlamaLinearKinds> w{};
  };
  std::vector<Block> blocks;
};

struct F32Ops {
  int threads = 1;
  void gemm_nt(const float* a, int64_t m, int64_t lda, const float* b, int64_t nb, int64_t ldb, int64_t k, float* c,
               int64_t ldc) const {
    detail::dense_gemm_nt(threads, a, m, lda, b, nb, ldb, k, c, ldc);
  }
  void parallel(int64_t n, const std::function<void(int64_t, int64_t)>& fn) const {
    detail::dense_parallel_for(threads, n, 1, fn);
  }
};

struct F64Ops {
  void gemm_nt(const double* a, int64_t m, int64_t lda, const double* b, int64_t nb, int64_t ldb, int64_t k, double* c,
               int64_t ldc) const {
    using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
    using MMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
    MMap(c, m, nb, Eigen::OuterStride<>(ldc)).noalias() =
        CMap(a, m, k, Eigen::OuterStride<>(lda)) * CMap(b, nb, k, Eigen::OuterStride<>(ldb)).transpose();
  }
  void parallel(int64_t n, const std::function<void(int64_t, int64_t)>& fn) const { fn(0, n); }
};

// out [cols, rows] = aᵀ for a [rows, cols] with row stride lda; in 32×32 blocks so both sides stay in cache.
template <class T>
void transpose(const T* a, int64_t rows, int64_t cols, int64_t lda, T* out) {
  constexpr int64_t B = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B) {
      const int64_t r1 = std::min(rows, r0 + B), c1 = std::min(cols, c0 + B);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) out[c * rows + r] = a[r * lda + c];
    }
}

template <class T>
void resize(std::vector<T>& v, int64_t n) {
  v.resize(std::size_t(n));
}

// y = x · s · w per token, s = 1/sqrt(mean(x²) + eps) accumulated in double, rounded where the decoder
// rounds it (llama.cpp's rms_norm). s is kept in double for the backward pass.
template <class T>
void rms_forward(const T* x, const T* w, int64_t n, int64_t dim, double eps, T* y, double* s_out) {
  for (int64_t t = 0; t < n; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += double(x[t * dim + i]) * double(x[t * dim + i]);
    const double s = 1.0 / std::sqrt(ss / double(dim) + eps);
    s_out[t] = s;
    const T st = T(s);
    for (int64_t i = 0; i < dim; ++i) y[t * dim + i] = x[t * dim + i] * st * w[i];
  }
}

// dx += ∂(x·s(x)·w)/∂x applied to dy: s·w⊙dy − x·s³/dim·Σ(dy⊙w⊙x), per token; and, when dw is set,
// dw = Σ_t dy⊙x·s (the gain's gradient), accumulated in double.
template <class T>
void rms_backward(const T* x, const double* s, const T* w, const T* dy, int64_t n, int64_t dim, T* dx,
                  std::vector<T>* dw = nullptr) {
  if (dw) {
    std::vector<double> acc(std::size_t(dim), 0.0);
    for (int64_t t = 0; t < n; ++t) {
      const double st = double(T(s[t]));  // the forward pass multiplied by s rounded to T
      for (int64_t i = 0; i < dim; ++i) acc[std::size_t(i)] += double(dy[t * dim + i]) * double(x[t * dim + i]) * st;
    }
    dw->resize(std::size_t(dim));
    for (int64_t i = 0; i < dim; ++i) (*dw)[std::size_t(i)] = T(acc[std::size_t(i)]);
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* xt = x + t * dim;
    const T* dyt = dy + t * dim;
    double dot = 0;
    for (int64_t i = 0; i < dim; ++i) dot += double(dyt[i]) * double(w[i]) * double(xt[i]);
    const double st = s[t], k = dot * st * st * st / double(dim);
    for (int64_t i = 0; i < dim; ++i)
      dx[t * dim + i] += T(st * double(w[i]) * double(dyt[i]) - double(xt[i]) * k);
  }
}

// Rotates (sign = +1) or un-rotates (sign = −1, the transpose of the rotation, for gradients) every head
// of x [n, heads, head_dim] at positions 0 .. n−1; cs holds cos, sin per (position, pair).
template <class T>
void rope(T* x, int64_t n, int64_t heads, int64_t hd, const std::vector<T>& cs, RopeLayout layout, int sign) {
  const int64_t half = hd / 2;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + (t * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = layout == RopeLayout::interleaved ? 2 * i : i;
        const int64_t b = layout == RopeLayout::interleaved ? 2 * i + 1 : i + half;
        const T c = cs[std::size_t((t * half + i) * 2)], s = sign * cs[std::size_t((t * half + i) * 2 + 1)];
        const T x0 = v[a], x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
      }
    }
}

template <class T>
struct LayerActs {
  std::vector<T> x_in, xb1, q, k, v, p, att, x_mid, xb2, g, u, h;
  std::vector<double> s1, s2;
};

template <class T, class Ops>
class Engine {
 public:
  Engine(const Net<T>* net, Ops ops) : net_(net), ops_(ops) {}

  // The transposed classifier for dX = dlogits · C, kept across windows (it is the largest single array).
  void prepare_classifier() {
    const LlamaConfig& c = net_->c;
    resize(cls_t_, c.vocab_size * c.dim);
    transpose(net_->classifier, c.vocab_size, c.dim, c.dim, cls_t_.data());
  }

  // Gradients of the RMSNorm gains from the last backward pass: per layer {attention, feed-forward}, and
  // the final norm's.
  std::vector<std::array<std::vector<T>, 2>> norm_grads_;
  std::vector<T> final_norm_grad_;

  // Forward (recording activations) and, when `grads` is set, backward. Returns the mean loss.
  // With `teacher` ([n, vocab] logits) the loss is the distillation loss instead of the NLL of `tg`.
  double run(const int32_t* in, const int32_t* tg, int64_t n,
             std::vector<std::array<std::vector<T>, kLlamaLinearKinds>>* grads, const float* teacher = nullptr) {
    const LlamaConfig& c = net_->c;
    NUQ_CHECK(n > 0, Errc::invalid_argument, "backward: no tokens");
    for (int64_t t = 0; t < n; ++t) {
      NUQ_CHECK(in[t] >= 0 && in[t] < c.vocab_size, Errc::invalid_argument,
                "backward: input token {} at position {} is outside the vocabulary of {}", in[t], t, c.vocab_size);
      NUQ_CHECK(teacher || (tg[t] >= 0 && tg[t] < c.vocab_size), Errc::invalid_argument,
                "backward: target token {} at position {} is outside the vocabulary of {}", tg[t], t, c.vocab_size);
    }
    n_ = n;
    forward(in);
    const double loss = teacher ? distillation_and_dlogits(teacher, grads != nullptr)
                                : loss_and_dlogits(tg, grads != nullptr);
    if (grads) backward(*grads);
    return loss;
  }

 private:
  const Net<T>* net_;
  Ops ops_;
  int64_t n_ = 0;
  std::vector<LayerActs<T>> acts_;
  std::vector<T> x_, x_final_, xf_, logits_, cs_, cls_t_;
  std::vector<double> sf_;
  // backward scratch
  std::vector<T> dx_, dtmp_, dbig_, dbig2_, dq_, dk_, dv_, wt_, xt_, dyt_, sq_, sq2_, hd_a_, hd_b_, hd_c_;

  void linear_fwd(const T* x, int64_t n, const T* w, int64_t rows, int64_t cols, T* y) const {
    ops_.gemm_nt(x, n, cols, w, rows, cols, cols, y, rows);
  }

  void forward(const int32_t* in) {
    const LlamaConfig& c = net_->c;
    const int64_t n = n_, D = c.dim, hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd, F = c.hidden_dim;
    const int64_t H = c.n_heads, group = c.n_heads / c.n_kv_heads, half = hd / 2;
    acts_.resize(std::size_t(c.n_layers));
    resize(x_, n * D);
    for (int64_t t = 0; t < n; ++t)
      std::copy_n(net_->embedding + int64_t(in[t]) * D, D, x_.data() + t * D);
    // cos/sin as the decoder computes them: angles in double, rounded to T.
    resize(cs_, n * half * 2);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < half; ++i) {
        const double a = double(t) * std::pow(c.rope_theta, -double(2 * i) / double(hd));
        cs_[std::size_t((t * half + i) * 2)] = T(std::cos(a));
        cs_[std::size_t((t * half + i) * 2 + 1)] = T(std::sin(a));
      }
    const T scale = T(1.0 / std::sqrt(double(hd)));
    std::vector<T> o(std::size_t(n * D));
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const auto& b = net_->blocks[std::size_t(l)];
      LayerActs<T>& A = acts_[std::size_t(l)];
      A.x_in = x_;
      resize(A.xb1, n * D), resize(A.q, n * qd), resize(A.k, n * kvd), resize(A.v, n * kvd), resize(A.att, n * qd);
      resize(A.p, H * n * n), resize(A.xb2, n * D), resize(A.g, n * F), resize(A.u, n * F), resize(A.h, n * F);
      A.s1.resize(std::size_t(n)), A.s2.resize(std::size_t(n));
      rms_forward(x_.data(), b.attn_norm, n, D, double(c.norm_eps), A.xb1.data(), A.s1.data());
      linear_fwd(A.xb1.data(), n, b.w[kQ], qd, D, A.q.data());
      linear_fwd(A.xb1.data(), n, b.w[kK], kvd, D, A.k.data());
      linear_fwd(A.xb1.data(), n, b.w[kV], kvd, D, A.v.data());
      rope(A.q.data(), n, H, hd, cs_, c.rope, +1);
      rope(A.k.data(), n, c.n_kv_heads, hd, cs_, c.rope, +1);
      resize(hd_a_, hd * n);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kvh = h / group;
        T* P = A.p.data() + h * n * n;
        // Scores for the whole square (the masked half is overwritten below): the tiles beat a
        // triangular loop by more than the factor two they waste.
        ops_.gemm_nt(A.q.data() + h * hd, n, qd, A.k.data() + kvh * hd, n, kvd, hd, P, n);
        ops_.parallel(n, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            T* row = P + t * n;
            T mx = -INFINITY;
            for (int64_t j = 0; j <= t; ++j) mx = std::max(mx, row[j] *= scale);
            double sum = 0;
            for (int64_t j = 0; j <= t; ++j) sum += double(row[j] = std::exp(row[j] - mx));
            const T inv = T(1.0 / sum);
            for (int64_t j = 0; j <= t; ++j) row[j] *= inv;
            std::fill(row + t + 1, row + n, T(0));
          }
        });
        transpose(A.v.data() + kvh * hd, n, hd, kvd, hd_a_.data());  // V_hᵀ [hd, n]
        ops_.gemm_nt(P, n, n, hd_a_.data(), hd, n, n, A.att.data() + h * hd, qd);
      }
      linear_fwd(A.att.data(), n, b.w[kO], D, qd, o.data());
      for (int64_t i = 0; i < n * D; ++i) x_[std::size_t(i)] += o[std::size_t(i)];
      A.x_mid = x_;
      rms_forward(x_.data(), b.ffn_norm, n, D, double(c.norm_eps), A.xb2.data(), A.s2.data());
      linear_fwd(A.xb2.data(), n, b.w[kGate], F, D, A.g.data());
      linear_fwd(A.xb2.data(), n, b.w[kUp], F, D, A.u.data());
      for (int64_t i = 0; i < n * F; ++i) {
        const T a = A.g[std::size_t(i)];
        A.h[std::size_t(i)] = a / (T(1) + std::exp(-a)) * A.u[std::size_t(i)];
      }
      linear_fwd(A.h.data(), n, b.w[kDown], D, F, o.data());
      for (int64_t i = 0; i < n * D; ++i) x_[std::size_t(i)] += o[std::size_t(i)];
    }
    x_final_ = x_;
    resize(xf_, n * D);
    sf_.resize(std::size_t(n));
    rms_forward(x_.data(), net_->final_norm, n, D, double(c.norm_eps), xf_.data(), sf_.data());
  }

  // logits_ = final hidden states · classifierᵀ, [n, vocab].
  void compute_logits() {
    const LlamaConfig& c = net_->c;
    resize(logits_, n_ * c.vocab_size);
    ops_.gemm_nt(xf_.data(), n_, c.dim, net_->classifier, c.vocab_size, c.dim, c.dim, logits_.data(), c.vocab_size);
  }

  static double mean(const std::vector<double>& v) {
    double total = 0;
    for (double x : v) total += x;
    return total / double(v.size());
  }

  // Mean NLL; with `grad`, logits_ is replaced by ∂loss/∂logits = (softmax − onehot)/n.
  double loss_and_dlogits(const int32_t* tg, bool grad) {
    const int64_t n = n_, V = net_->c.vocab_size;
    compute_logits();
    std::vector<double> nll(static_cast<std::size_t>(n));
    ops_.parallel(n, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        T* l = logits_.data() + t * V;
        double mx = double(l[0]);
        for (int64_t v = 1; v < V; ++v) mx = std::max(mx, double(l[v]));
        double sum = 0;
        for (int64_t v = 0; v < V; ++v) sum += std::exp(double(l[v]) - mx);
        nll[std::size_t(t)] = std::log(sum) + mx - double(l[tg[t]]);
        if (!grad) continue;
        const double inv_n = 1.0 / double(n);
        for (int64_t v = 0; v < V; ++v) l[v] = T(std::exp(double(l[v]) - mx) / sum * inv_n);
        l[tg[t]] -= T(inv_n);
      }
    });
    return mean(nll);
  }

  // Mean over positions of KL(p ‖ q), p = softmax(teacher logits), q = softmax(own logits); with `grad`,
  // logits_ is replaced by ∂loss/∂logits = (q − p)/n. A teacher logit that is not finite throws.
  double distillation_and_dlogits(const float* teacher, bool grad) {
    const int64_t n = n_, V = net_->c.vocab_size;
    compute_logits();
    std::vector<double> kl(static_cast<std::size_t>(n));
    std::vector<int64_t> bad(static_cast<std::size_t>(n), -1);
    ops_.parallel(n, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        T* l = logits_.data() + t * V;
        const float* p = teacher + t * V;
        double mq = double(l[0]), mp = double(p[0]);
        for (int64_t v = 0; v < V; ++v) {
          if (!std::isfinite(p[v])) bad[std::size_t(t)] = v;
          mq = std::max(mq, double(l[v])), mp = std::max(mp, double(p[v]));
        }
        if (bad[std::size_t(t)] >= 0) continue;
        double sq = 0, sp = 0;
        for (int64_t v = 0; v < V; ++v) sq += std::exp(double(l[v]) - mq), sp += std::exp(double(p[v]) - mp);
        const double lq = std::log(sq) + mq, lp = std::log(sp) + mp;
        double sum = 0;
        const double inv_n = 1.0 / double(n);
        for (int64_t v = 0; v < V; ++v) {
          const double log_p = double(p[v]) - lp, log_q = double(l[v]) - lq, pv = std::exp(log_p);
          sum += pv * (log_p - log_q);
          if (grad) l[v] = T((std::exp(log_q) - pv) * inv_n);
        }
        kl[std::size_t(t)] = sum;
      }
    });
    for (int64_t t = 0; t < n; ++t)
      NUQ_CHECK(bad[std::size_t(t)] < 0, Errc::invalid_argument,
                "backward: the teacher's logit {} at position {} is not finite", bad[std::size_t(t)], t);
    return mean(kl);
  }

  // dW = dYᵀ·X with X given transposed (xt [cols, n]): dW [rows, cols].
  void weight_grad(const T* dy, int64_t rows, const T* xt, int64_t cols, std::vector<T>& dw) {
    const int64_t n = n_;
    resize(dyt_, rows * n);
    transpose(dy, n, rows, rows, dyt_.data());
    resize(dw, rows * cols);
    ops_.gemm_nt(dyt_.data(), rows, n, xt, cols, n, n, dw.data(), cols);
  }

  // dX (+)= dY·W for W [rows, cols]: dX [n, cols].
  void input_grad(const T* dy, const T* w, int64_t rows, int64_t cols, T* dx, bool accumulate) {
    const int64_t n = n_;
    resize(wt_, rows * cols);
    transpose(w, rows, cols, cols, wt_.data());
    if (!accumulate) return ops_.gemm_nt(dy, n, rows, wt_.data(), cols, rows, rows, dx, cols);
    resize(dtmp_, n * cols);
    ops_.gemm_nt(dy, n, rows, wt_.data(), cols, rows, rows, dtmp_.data(), cols);
    for (int64_t i = 0; i < n * cols; ++i) dx[i] += dtmp_[std::size_t(i)];
  }

  void backward(std::vector<std::array<std::vector<T>, kLlamaLinearKinds>>& grads) {
    const LlamaConfig& c = net_->c;
    const int64_t n = n_, D = c.dim, hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd, F = c.hidden_dim;
    const int64_t H = c.n_heads, group = c.n_heads / c.n_kv_heads, V = c.vocab_size;
    grads.resize(std::size_t(c.n_layers));
    // Through the classifier and the final norm.
    std::vector<T> dxf(std::size_t(n * D));
    if (cls_t_.empty()) prepare_classifier();
    ops_.gemm_nt(logits_.data(), n, V, cls_t_.data(), D, V, V, dxf.data(), D);
    resize(dx_, n * D);
    std::fill(dx_.begin(), dx_.end(), T(0));
    norm_grads_.resize(std::size_t(c.n_layers));
    rms_backward(x_final_.data(), sf_.data(), net_->final_norm, dxf.data(), n, D, dx_.data(), &final_norm_grad_);
    const T scale = T(1.0 / std::sqrt(double(hd)));
    std::vector<T> dxb(std::size_t(n * D));
    for (int64_t l = c.n_layers - 1; l >= 0; --l) {
      const auto& b = net_->blocks[std::size_t(l)];
      const LayerActs<T>& A = acts_[std::size_t(l)];
      auto& G = grads[std::size_t(l)];
      // ---- feed-forward: x_out = x_mid + down(silu(gate(xb2)) ⊙ up(xb2))
      resize(xt_, F * n);
      transpose(A.h.data(), n, F, F, xt_.data());
      weight_grad(dx_.data(), D, xt_.data(), F, G[kDown]);
      resize(dbig_, n * F), resize(dbig2_, n * F);
      input_grad(dx_.data(), b.w[kDown], D, F, dbig_.data(), false);  // dh
      for (int64_t i = 0; i < n * F; ++i) {
        const T g = A.g[std::size_t(i)], dh = dbig_[std::size_t(i)];
        const T sig = T(1) / (T(1) + std::exp(-g));
        dbig2_[std::size_t(i)] = dh * g * sig;                                    // du
        dbig_[std::size_t(i)] = dh * A.u[std::size_t(i)] * sig * (T(1) + g * (T(1) - sig));  // dg
      }
      resize(xt_, D * n);
      transpose(A.xb2.data(), n, D, D, xt_.data());
      weight_grad(dbig_.data(), F, xt_.data(), D, G[kGate]);
      weight_grad(dbig2_.data(), F, xt_.data(), D, G[kUp]);
      input_grad(dbig_.data(), b.w[kGate], F, D, dxb.data(), false);
      input_grad(dbig2_.data(), b.w[kUp], F, D, dxb.data(), true);
      rms_backward(A.x_mid.data(), A.s2.data(), b.ffn_norm, dxb.data(), n, D, dx_.data(), &norm_grads_[std::size_t(l)][1]);
      // ---- attention: x_mid = x_in + o(attention(rope(q(xb1)), rope(k(xb1)), v(xb1)))
      resize(xt_, qd * n);
      transpose(A.att.data(), n, qd, qd, xt_.data());
      weight_grad(dx_.data(), D, xt_.data(), qd, G[kO]);
      std::vector<T> datt(std::size_t(n * qd));
      input_grad(dx_.data(), b.w[kO], D, qd, datt.data(), false);
      resize(dq_, n * qd), resize(dk_, n * kvd), resize(dv_, n * kvd);
      std::fill(dk_.begin(), dk_.end(), T(0));
      std::fill(dv_.begin(), dv_.end(), T(0));
      resize(sq_, n * n), resize(sq2_, n * n), resize(hd_a_, hd * n), resize(hd_b_, n * hd);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kvh = h / group;
        const T* P = A.p.data() + h * n * n;
        const T* dO = datt.data() + h * hd;  // [n, hd], stride qd
        // dP = dO·V_hᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale (softmax and score scaling).
        ops_.gemm_nt(dO, n, qd, A.v.data() + kvh * hd, n, kvd, hd, sq_.data(), n);
        ops_.parallel(n, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            T* row = sq_.data() + t * n;
            const T* prow = P + t * n;
            double dot = 0;
            for (int64_t j = 0; j <= t; ++j) dot += double(prow[j]) * double(row[j]);
            for (int64_t j = 0; j <= t; ++j) row[j] = prow[j] * (row[j] - T(dot)) * scale;
            std::fill(row + t + 1, row + n, T(0));
          }
        });
        // dV_h += Pᵀ·dO
        transpose(P, n, n, n, sq2_.data());
        transpose(dO, n, hd, qd, hd_a_.data());
        ops_.gemm_nt(sq2_.data(), n, n, hd_a_.data(), hd, n, n, hd_b_.data(), hd);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t i = 0; i < hd; ++i) dv_[std::size_t(t * kvd + kvh * hd + i)] += hd_b_[std::size_t(t * hd + i)];
        // dQ_h = dS·K_h
        transpose(A.k.data() + kvh * hd, n, hd, kvd, hd_a_.data());
        ops_.gemm_nt(sq_.data(), n, n, hd_a_.data(), hd, n, n, dq_.data() + h * hd, qd);
        // dK_h += dSᵀ·Q_h
        transpose(sq_.data(), n, n, n, sq2_.data());
        transpose(A.q.data() + h * hd, n, hd, qd, hd_a_.data());
        ops_.gemm_nt(sq2_.data(), n, n, hd_a_.data(), hd, n, n, hd_b_.data(), hd);
        for (int64_t t = 0; t < n; ++t)
          for (int64_t i = 0; i < hd; ++i) dk_[std::size_t(t * kvd + kvh * hd + i)] += hd_b_[std::size_t(t * hd + i)];
      }
      rope(dq_.data(), n, H, hd, cs_, c.rope, -1);
      rope(dk_.data(), n, c.n_kv_heads, hd, cs_, c.rope, -1);
      resize(xt_, D * n);
      transpose(A.xb1.data(), n, D, D, xt_.data());
      weight_grad(dq_.data(), qd, xt_.data(), D, G[kQ]);
      weight_grad(dk_.data(), kvd, xt_.data(), D, G[kK]);
      weight_grad(dv_.data(), kvd, xt_.data(), D, G[kV]);
      input_grad(dq_.data(), b.w[kQ], qd, D, dxb.data(), false);
      input_grad(dk_.data(), b.w[kK], kvd, D, dxb.data(), true);
      input_grad(dv_.data(), b.w[kV], kvd, D, dxb.data(), true);
      rms_backward(A.x_in.data(), A.s1.data(), b.attn_norm, dxb.data(), n, D, dx_.data(), &norm_grads_[std::size_t(l)][0]);
    }
  }
};

void validate(const LlamaWeights& w) {
  const LlamaConfig& c = w.config;
  NUQ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.head_dim > 0 &&
                c.vocab_size > 0,
            Errc::invalid_argument, "backward: the model configuration has a non-positive size");
  NUQ_CHECK(c.n_heads % c.n_kv_heads == 0 && c.head_dim % 2 == 0, Errc::invalid_argument,
            "backward: {} heads are not a multiple of {} key/value heads, or head_dim {} is odd", c.n_heads,
            c.n_kv_heads, c.head_dim);
  NUQ_CHECK(w.embedding && w.classifier && w.final_norm, Errc::invalid_argument,
            "backward: the embedding, classifier or final norm is missing");
  NUQ_CHECK(int64_t(w.blocks.size()) == c.n_layers, Errc::invalid_argument,
            "backward: {} blocks of weights for a model of {} layers", w.blocks.size(), c.n_layers);
  const int64_t qd = c.n_heads * c.head_dim, kvd = c.n_kv_heads * c.head_dim;
  const int64_t want[kLlamaLinearKinds][2] = {{qd, c.dim},         {kvd, c.dim},        {kvd, c.dim},      {c.dim, qd},
                                              {c.hidden_dim, c.dim}, {c.hidden_dim, c.dim}, {c.dim, c.hidden_dim}};
  for (std::size_t l = 0; l < w.blocks.size(); ++l) {
    const LlamaBlockWeights& b = w.blocks[l];
    NUQ_CHECK(b.attn_norm && b.ffn_norm, Errc::invalid_argument, "backward: block {} has no norm weights", l);
    for (int i = 0; i < kLlamaLinearKinds; ++i) {
      const LlamaLinearWeights& lw = b.linear[std::size_t(i)];
      NUQ_CHECK(lw.data && lw.rows == want[i][0] && lw.cols == want[i][1], Errc::invalid_argument,
                "backward: block {} weight {} ('{}') is [{}, {}]{}, the configuration implies [{}, {}]", l,
                to_string(LlamaLinearKind(i)), lw.name, lw.rows, lw.cols, lw.data ? "" : " without data", want[i][0],
                want[i][1]);
    }
  }
}

Net<float> float_net(const LlamaWeights& w) {
  Net<float> net;
  net.c = w.config;
  net.embedding = w.embedding;
  net.classifier = w.classifier;
  net.final_norm = w.final_norm;
  for (const LlamaBlockWeights& b : w.blocks) {
    auto& nb = net.blocks.emplace_back();
    nb.attn_norm = b.attn_norm;
    nb.ffn_norm = b.ffn_norm;
    for (int i = 0; i < kLlamaLinearKinds; ++i) nb.w[std::size_t(i)] = b.linear[std::size_t(i)].data;
  }
  return net;
}

// A double copy of the weights and the Net pointing into it.
struct DoubleModel {
  std::vector<std::vector<double>> store;
  Net<double> net;
  explicit DoubleModel(const LlamaWeights& w) {
    const LlamaConfig& c = w.config;
    store.reserve(std::size_t(3 + 9 * c.n_layers));
    auto copy = [&](const float* p, int64_t n) {
      return store.emplace_back(p, p + n).data();
    };
    net.c = c;
    net.embedding = copy(w.embedding, c.vocab_size * c.dim);
    net.classifier = w.classifier == w.embedding ? net.embedding : copy(w.classifier, c.vocab_size * c.dim);
    net.final_norm = copy(w.final_norm, c.dim);
    for (const LlamaBlockWeights& b : w.blocks) {
      auto& nb = net.blocks.emplace_back();
      nb.attn_norm = copy(b.attn_norm, c.dim);
      nb.ffn_norm = copy(b.ffn_norm, c.dim);
      for (int i = 0; i < kLlamaLinearKinds; ++i)
        nb.w[std::size_t(i)] = copy(b.linear[std::size_t(i)].data, b.linear[std::size_t(i)].rows * b.linear[std::size_t(i)].cols);
    }
  }
};

}  // namespace

struct LlamaBackward::Impl {
  LlamaWeights weights;
  Net<float> net;
  Engine<float, F32Ops> engine;
  Impl(LlamaWeights w, int threads)
      : weights(std::move(w)), net(float_net(weights)), engine(&net, F32Ops{cpu::detail::resolve_threads(threads)}) {}
};

LlamaBackward::LlamaBackward(LlamaWeights weights, int threads) {
  validate(weights);
  impl_ = std::make_unique<Impl>(std::move(weights), threads);
}
LlamaBackward::~LlamaBackward() = default;
LlamaBackward::LlamaBackward(LlamaBackward&&) noexcept = default;

const LlamaWeights& LlamaBackward::weights() const noexcept { return impl_->weights; }

void LlamaBackward::compute(const int32_t* inputs, const int32_t* targets, int64_t n, LlamaGradients& out) {
  out.loss = impl_->engine.run(inputs, targets, n, &out.linear);
  out.positions = n;
  out.norms = impl_->engine.norm_grads_;
  out.final_norm = impl_->engine.final_norm_grad_;
}

void LlamaBackward::compute_distillation(const int32_t* inputs, const float* teacher_logits, int64_t n,
                                         LlamaGradients& out) {
  NUQ_CHECK(teacher_logits, Errc::invalid_argument, "backward: no teacher logits");
  out.loss = impl_->engine.run(inputs, inputs, n, &out.linear, teacher_logits);
  out.positions = n;
  out.norms = impl_->engine.norm_grads_;
  out.final_norm = impl_->engine.final_norm_grad_;
}

double LlamaBackward::distillation_loss(const int32_t* inputs, const float* teacher_logits, int64_t n) {
  NUQ_CHECK(teacher_logits, Errc::invalid_argument, "backward: no teacher logits");
  return impl_->engine.run(inputs, inputs, n, nullptr, teacher_logits);
}

double LlamaBackward::loss(const int32_t* inputs, const int32_t* targets, int64_t n) {
  return impl_->engine.run(inputs, targets, n, nullptr);
}

LlamaGradientsF64 llama_gradients_f64(const LlamaWeights& weights, const int32_t* inputs, const int32_t* targets,
                                      int64_t n) {
  validate(weights);
  DoubleModel m(weights);
  Engine<double, F64Ops> engine(&m.net, F64Ops{});
  LlamaGradientsF64 out;
  out.loss = engine.run(inputs, targets, n, &out.linear);
  out.positions = n;
  return out;
}

double llama_loss_f64(const LlamaWeights& weights, const int32_t* inputs, const int32_t* targets, int64_t n) {
  validate(weights);
  DoubleModel m(weights);
  Engine<double, F64Ops> engine(&m.net, F64Ops{});
  return engine.run(inputs, targets, n, nullptr);
}

FisherCollectResult collect_fisher(LlamaBackward& backward, const std::vector<int32_t>& ids, int32_t start,
                                   int64_t ctx, FisherAccumulator& acc, const FisherProgress& progress) {
  NUQ_CHECK(ctx >= 2, Errc::invalid_argument, "fisher: the window length must be at least 2 tokens, got {}", ctx);
  NUQ_CHECK(!ids.empty(), Errc::invalid_argument, "fisher: no tokens to run");
  const LlamaWeights& w = backward.weights();
  const int64_t windows = window_count(int64_t(ids.size()), ctx);
  FisherCollectResult r;
  LlamaGradients g;
  double loss_sum = 0;
  std::vector<int32_t> input;
  for (int64_t wi = 0; wi < windows; ++wi) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto [begin, len] = window_input(ids, start, ctx, wi, input);
    backward.compute(input.data(), ids.data() + begin, len, g);
    // Every gradient is checked before any is added, so a failing window leaves `acc` as it was.
    for (std::size_t l = 0; l < g.linear.size(); ++l)
      for (int k = 0; k < kLlamaLinearKinds; ++k) {
        const std::vector<float>& v = g.linear[l][std::size_t(k)];
        const LlamaLinearWeights& lw = w.blocks[l].linear[std::size_t(k)];
        for (std::size_t i = 0; i < v.size(); ++i)
          NUQ_CHECK(std::isfinite(v[i]), Errc::invalid_argument,
                    "fisher: window {} (tokens {}..{}): the gradient of '{}.weight' is {} at [{}, {}] (loss {})", wi,
                    begin, begin + len - 1, lw.name, v[i], int64_t(i) / lw.cols, int64_t(i) % lw.cols, g.loss);
      }
    for (std::size_t l = 0; l < g.linear.size(); ++l)
      for (int k = 0; k < kLlamaLinearKinds; ++k) {
        const LlamaLinearWeights& lw = w.blocks[l].linear[std::size_t(k)];
        acc.add(lw.name + ".weight", g.linear[l][std::size_t(k)].data(), Shape{lw.rows, lw.cols});
      }
    loss_sum += g.loss * double(len);
    r.tokens += len;
    ++r.windows;
    if (progress)
      progress(wi, windows, g.loss, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  r.mean_loss = loss_sum / double(r.tokens);
  return r;
}

}  // namespace nuq
