// Batch norm on CPU tensors in a few fused loops: bnlib's fast CPU path.
// (Layer, group and instance norm, the same formulas per row, are at the end.)
//
// The formulas are those of bnlib/functional.py (and the chapter "The Batch
// Normalization algorithm"); only the number of passes over memory changes.
// The tensor-op path of functional.py needs about 8 |x| of traffic forward
// and 14 |x| backward (chapter "Making BN fast"); these loops move
//
//   training forward : read x (statistics) + read x, write y      = 3 |x|
//   training backward: read x, dy (two sums) + read x, dy, write dx = 5 |x|
//   eval forward     : read x, write y                            = 2 |x|
//
// Layouts. A contiguous (N, C, S...) tensor is N*C "planes" of S values;
// a channels-last one, and a contiguous (N, C), is M "rows" of C values.
// Every loop walks memory in order.
//
// Statistics in one pass, and stable (the contract: never E[x^2] - E[x]^2).
// Each run of values (a stretch of a plane, or a block of rows) is summed as
// d = x - a, with a shift `a` near the channel's mean: the run's own mean for
// the first run of a channel, the channel's mean so far after that. Then the
// run's mean is a + sum(d)/n and its M2 = sum(d^2) - sum(d)^2/n, with no
// cancellation since |d| is on the scale of the spread, not of the mean.
// Runs are merged in double with Chan's formula, the merge the Triton kernels
// and bnlib.perf.chan_merge use.
//
// Threads: at::parallel_for, so torch.set_num_threads() governs these loops
// as it does torch's own (the same OpenMP runtime: torch's libgomp).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Values summed in the input's dtype before they are added into double: a
// plane is cut into runs of kBlockBytes, a rows-layout tensor into kRowBlock rows.
constexpr int64_t kBlockBytes = 32 * 1024;
constexpr int64_t kRowBlock = 64;

struct Layout {
  int64_t planes;    // N for planes, unused for rows
  int64_t channels;  // C
  int64_t inner;     // S values per plane; 1 for rows
  int64_t rows;      // M rows for the rows layout, 0 for planes
};

// A 4-D channels-last or 5-D channels-last-3d tensor, dense in that order.
bool channels_last_contiguous(const at::Tensor& x) {
  return (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bnlib batch norm: expected (N, C, ...), got ", x.dim(), " dims");
  const int64_t C = x.size(1);
  if (x.is_contiguous()) {
    const int64_t N = x.size(0);
    int64_t S = 1;
    for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
    if (S == 1) return {0, C, 1, N};
    return {N, C, S, 0};
  }
  TORCH_CHECK(channels_last_contiguous(x), "bnlib batch norm: expected a contiguous or channels-last input");
  return {0, C, 1, C > 0 ? x.numel() / C : 0};
}

// Chan et al.: merge the summary (nb, mean_b, m2_b) into (n, mean, m2); the
// caller adds nb to n.
inline void chan_merge(double n, double& mean, double& m2, double nb, double mean_b, double m2_b) {
  const double total = n + nb;
  const double delta = mean_b - mean;
  mean += delta * (nb / total);
  m2 += m2_b + delta * delta * (n * nb / total);
}

// Split [0, count) into `tasks` contiguous ranges, one per thread: task t's range.
inline std::pair<int64_t, int64_t> task_range(int64_t t, int64_t tasks, int64_t count) {
  return {t * count / tasks, (t + 1) * count / tasks};
}

inline int64_t num_tasks(int64_t count, int64_t min_per_task) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count / min_per_task));
}

// Per-channel summaries (count, mean, M2) of each task, merged per channel in
// task order into mean[c], m2[c].
void merge_tasks(const std::vector<double>& n, const std::vector<double>& tmean, const std::vector<double>& tm2,
                 int64_t tasks, int64_t C, double* mean, double* m2) {
  for (int64_t c = 0; c < C; ++c) {
    double cn = 0, mu = 0, M2 = 0;
    for (int64_t t = 0; t < tasks; ++t) {
      const double nb = n[t * C + c];
      if (nb == 0) continue;
      chan_merge(cn, mu, M2, nb, tmean[t * C + c], tm2[t * C + c]);
      cn += nb;
    }
    mean[c] = mu;
    m2[c] = M2;
  }
}

// sum(x - shift) and sum((x - shift)^2) over len values, summed in T (the
// caller keeps len to a block, and adds the sums into double).
template <typename T>
inline void shifted_sums(const T* p, int64_t len, T shift, T& sum_d, T& sum_d2) {
  T a = 0, c = 0;
#pragma omp simd reduction(+ : a, c)
  for (int64_t j = 0; j < len; ++j) {
    const T d = p[j] - shift;
    a += d;
    c += d * d;
  }
  sum_d = a;
  sum_d2 = c;
}

// Per-channel mean and M2 of a planes-layout tensor. The planes are read in
// memory order (the hardware prefetcher streams them; walking one channel's
// planes, C * S values apart, is several times slower), split among threads;
// each thread keeps a summary per channel.
template <typename T>
void plane_stats(const T* x, const Layout& L, double* mean, double* m2) {
  const int64_t C = L.channels, S = L.inner, P = L.planes * C;
  const int64_t tasks = num_tasks(P, 1);
  const int64_t chunk = std::max<int64_t>(1, kBlockBytes / static_cast<int64_t>(sizeof(T)));
  std::vector<double> n(tasks * C, 0.0), tmean(tasks * C, 0.0), tm2(tasks * C, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto [i0, i1] = task_range(t, tasks, P);
      double* cn = n.data() + t * C;
      double* cmean = tmean.data() + t * C;
      double* cm2 = tm2.data() + t * C;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        const T* plane = x + i * S;
        for (int64_t s0 = 0; s0 < S; s0 += chunk) {
          const int64_t len = std::min(chunk, S - s0);
          const T* p = plane + s0;
          T a;
          if (cn[c] == 0) {  // first values of this channel: shift by their own mean
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < len; ++j) sum += p[j];
            a = sum / static_cast<T>(len);
          } else {  // afterwards, by the channel's mean so far
            a = static_cast<T>(cmean[c]);
          }
          T s1, s2;
          shifted_sums(p, len, a, s1, s2);
          const double nb = static_cast<double>(len);
          chan_merge(cn[c], cmean[c], cm2[c], nb, a + static_cast<double>(s1) / nb,
                     static_cast<double>(s2) - static_cast<double>(s1) * s1 / nb);
          cn[c] += nb;
        }
      }
    }
  });
  merge_tasks(n, tmean, tm2, tasks, C, mean, m2);
}

// Per-channel mean and M2 of a rows-layout tensor (M, C): rows are split among
// threads; each summarizes its rows kRowBlock at a time, vectorized along the
// channels, four rows per step so the per-channel sums are loaded and stored
// once per four rows.
template <typename T>
void row_stats(const T* x, const Layout& L, double* mean, double* m2) {
  const int64_t M = L.rows, C = L.channels;
  const int64_t tasks = num_tasks(M, 16);
  std::vector<double> n(tasks * C, 0.0), tmean(tasks * C, 0.0), tm2(tasks * C, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> a(C), s1(C), s2(C);
    for (int64_t t = t0; t < t1; ++t) {
      const auto [r0, r1] = task_range(t, tasks, M);
      double* tmean_t = tmean.data() + t * C;
      double* tm2_t = tm2.data() + t * C;
      double count = 0;
      for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
        const int64_t re = std::min(rb + kRowBlock, r1);
        if (count == 0) {  // the first block: shift by its own mean
          std::fill(a.begin(), a.end(), T(0));
          for (int64_t r = rb; r < re; ++r) {
            const T* row = x + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a[c] += row[c];
          }
          const T inv = T(1) / static_cast<T>(re - rb);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) a[c] *= inv;
        } else {  // later blocks: by the mean so far
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) a[c] = static_cast<T>(tmean_t[c]);
        }
        std::fill(s1.begin(), s1.end(), T(0));
        std::fill(s2.begin(), s2.end(), T(0));
        int64_t r = rb;
        for (; r + 4 <= re; r += 4) {
          const T* x0 = x + r * C;
          const T* x1 = x0 + C;
          const T* x2 = x1 + C;
          const T* x3 = x2 + C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d0 = x0[c] - a[c], d1 = x1[c] - a[c], d2 = x2[c] - a[c], d3 = x3[c] - a[c];
            s1[c] += (d0 + d1) + (d2 + d3);
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
          }
        }
        for (; r < re; ++r) {
          const T* row = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d = row[c] - a[c];
            s1[c] += d;
            s2[c] += d * d;
          }
        }
        // Chan's merge of the block into the task's summary; the weights are
        // the same for every channel.
        const double nb = static_cast<double>(re - rb), total = count + nb;
        const double inv_nb = 1.0 / nb, w_mean = nb / total, w_m2 = count * nb / total;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double bsum = static_cast<double>(s1[c]);
          const double delta = (static_cast<double>(a[c]) + bsum * inv_nb) - tmean_t[c];
          tmean_t[c] += delta * w_mean;
          tm2_t[c] += (static_cast<double>(s2[c]) - bsum * bsum * inv_nb) + delta * delta * w_m2;
        }
        count = total;
      }
      std::fill(n.begin() + t * C, n.begin() + (t + 1) * C, count);
    }
  });
  merge_tasks(n, tmean, tm2, tasks, C, mean, m2);
}

// out = (x - center) * a + shift, per channel (and, with dy, + k * dy): the
// one elementwise pass of the forward, y = (x - mu) * gamma * invstd + beta,
// and of the backward, dx = k * dy + a * (x - mu) + b. Subtracting the center
// first costs nothing (the loop waits on memory) and keeps the digits that
// x * a + (shift - center * a) would cancel away when |mu| >> std.
template <typename T>
void channel_affine(const T* x, const T* dy, T* out, const Layout& L, const T* center, const T* a, const T* shift,
                    const T* k) {
  const int64_t C = L.channels;
  if (L.rows > 0) {
    const int64_t grain = std::max<int64_t>(1, 32768 / C);
    at::parallel_for(0, L.rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * C;
        T* outr = out + r * C;
        if (dy == nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) outr[c] = (xr[c] - center[c]) * a[c] + shift[c];
        } else {
          const T* dyr = dy + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) outr[c] = dyr[c] * k[c] + (xr[c] - center[c]) * a[c] + shift[c];
        }
      }
    });
    return;
  }
  const int64_t S = L.inner;
  const int64_t grain = std::max<int64_t>(1, 32768 / S);
  at::parallel_for(0, L.planes * C, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % C;
      const T* xp = x + i * S;
      T* outp = out + i * S;
      const T mc = center[c], ac = a[c], sc = shift[c];
      if (dy == nullptr) {
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) outp[s] = (xp[s] - mc) * ac + sc;
      } else {
        const T* dyp = dy + i * S;
        const T kc = k[c];
#pragma omp simd
        for (int64_t s = 0; s < S; ++s) outp[s] = dyp[s] * kc + (xp[s] - mc) * ac + sc;
      }
    }
  });
}

// The backward's two reductions, per channel, in double:
// sum_dy = sum(dy), sum_dy_xc = sum(dy * (x - mean)). Memory order and threads
// as for the statistics.
template <typename T>
void backward_sums(const T* x, const T* dy, const Layout& L, const T* mean, double* sum_dy, double* sum_dy_xc) {
  const int64_t C = L.channels;
  const bool rows = L.rows > 0;
  const int64_t count = rows ? L.rows : L.planes * C;
  const int64_t tasks = num_tasks(count, rows ? 16 : 1);
  std::vector<double> part(tasks * 2 * C, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> b_dy(rows ? C : 0), b_dyxc(rows ? C : 0);
    for (int64_t t = t0; t < t1; ++t) {
      double* p_dy = part.data() + t * 2 * C;
      double* p_dyxc = p_dy + C;
      const auto [i0, i1] = task_range(t, tasks, count);
      if (rows) {
        for (int64_t rb = i0; rb < i1; rb += kRowBlock) {
          const int64_t re = std::min(rb + kRowBlock, i1);
          std::fill(b_dy.begin(), b_dy.end(), T(0));
          std::fill(b_dyxc.begin(), b_dyxc.end(), T(0));
          int64_t r = rb;
          for (; r + 2 <= re; r += 2) {
            const T* x0 = x + r * C;
            const T* x1 = x0 + C;
            const T* g0 = dy + r * C;
            const T* g1 = g0 + C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              b_dy[c] += g0[c] + g1[c];
              b_dyxc[c] += g0[c] * (x0[c] - mean[c]) + g1[c] * (x1[c] - mean[c]);
            }
          }
          for (; r < re; ++r) {
            const T* x0 = x + r * C;
            const T* g0 = dy + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              b_dy[c] += g0[c];
              b_dyxc[c] += g0[c] * (x0[c] - mean[c]);
            }
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            p_dy[c] += b_dy[c];
            p_dyxc[c] += b_dyxc[c];
          }
        }
      } else {
        const int64_t S = L.inner;
        const int64_t chunk = std::max<int64_t>(1, kBlockBytes / static_cast<int64_t>(sizeof(T)));
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i % C;
          const T mc = mean[c];
          const T* xp = x + i * S;
          const T* gp = dy + i * S;
          for (int64_t s0 = 0; s0 < S; s0 += chunk) {
            const int64_t s1 = std::min(S, s0 + chunk);
            T sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
            for (int64_t s = s0; s < s1; ++s) {
              sa += gp[s];
              sb += gp[s] * (xp[s] - mc);
            }
            p_dy[c] += sa;
            p_dyxc[c] += sb;
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t t = 0; t < tasks; ++t) {
      a += part[t * 2 * C + c];
      b += part[t * 2 * C + C + c];
    }
    sum_dy[c] = a;
    sum_dy_xc[c] = b;
  }
}

template <typename T>
const T* optional_data(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

void check_per_channel(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->numel() == x.size(1) && t->is_contiguous() && t->scalar_type() == x.scalar_type(),
              "bnlib batch norm: ", name, " must be a contiguous (C,) tensor of the input's dtype");
}

// dy must match x in shape, dtype and memory layout.
void check_dy(const at::Tensor& dy, const at::Tensor& x, const Layout& L) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "bnlib batch norm backward: dy must have x's shape and dtype");
  const Layout Ldy = layout_of(dy);
  TORCH_CHECK(Ldy.rows == L.rows && Ldy.planes == L.planes && Ldy.inner == L.inner,
              "bnlib batch norm backward: dy must be laid out in memory as x is (both contiguous or both "
              "channels-last)");
}

// start + w * (end - start), in double, as torch.lerp (what the tensor-op path
// calls) spells it: from the end when w >= 1/2, so that w = 1 gives end
// exactly. (start + w * (end - start) at w = 1 returns start + (end - start),
// which loses a small end against a large start: a batch variance of 1e-8
// against the initial running variance of 1 came back as 0.)
inline double lerp(double start, double end, double w) {
  return w < 0.5 ? start + w * (end - start) : end - (end - start) * (1.0 - w);
}

// running = (1 - momentum) * running + momentum * batch, per channel, with the
// unbiased variance var * m / (m - 1); channels whose statistics are not finite
// keep their running values (the contract's NaN rule).
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& var, int64_t m, double momentum) {
  const int64_t C = mean.numel();
  TORCH_CHECK(running_mean.numel() == C && running_var.numel() == C && running_mean.is_contiguous() &&
                  running_var.is_contiguous() && running_mean.scalar_type() == mean.scalar_type() &&
                  running_var.scalar_type() == mean.scalar_type(),
              "bnlib update_running_stats: running stats must be contiguous (C,) tensors of the statistics' dtype");
  const double correction = m > 1 ? static_cast<double>(m) / (m - 1) : 1.0;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnlib_update_running_stats", [&] {
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    const scalar_t* v = var.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t unbiased = static_cast<scalar_t>(v[c] * correction);
      if (!std::isfinite(unbiased)) continue;
      rm[c] = static_cast<scalar_t>(lerp(rm[c], mu[c], momentum));
      rv[c] = static_cast<scalar_t>(lerp(rv[c], unbiased, momentum));
    }
  });
  // An in-place change autograd must see, as torch's in-place ops do: a graph
  // that saved these buffers (an eval-mode forward) then refuses a stale backward.
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
}

// Training forward: y, and the per-channel mean, biased variance and invstd.
// With running estimates given, also updates them (update_running_stats), so
// that a training step is one call.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  const Layout L = layout_of(x);
  TORCH_CHECK(x.numel() > 0, "bnlib batch norm: empty input");
  check_per_channel(weight, x, "weight");
  check_per_channel(bias, x, "bias");
  const int64_t C = L.channels;
  const double m = static_cast<double>(x.numel() / C);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({C}, x.options());
  at::Tensor var = at::empty({C}, x.options());
  at::Tensor invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_batch_norm_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    std::vector<double> mu(C), m2(C);
    if (L.rows > 0) {
      row_stats(xp, L, mu.data(), m2.data());
    } else {
      plane_stats(xp, L, mu.data(), m2.data());
    }
    const scalar_t* w = optional_data<scalar_t>(weight);
    const scalar_t* b = optional_data<scalar_t>(bias);
    std::vector<scalar_t> scale(C), shift(C);  // y = (x - mean) * scale + shift
    scalar_t* mean_p = mean.data_ptr<scalar_t>();
    scalar_t* var_p = var.data_ptr<scalar_t>();
    scalar_t* invstd_p = invstd.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      // The statistics are rounded to the input's dtype first, then used, as
      // the tensor-op path does: y depends only on what is saved for backward.
      mean_p[c] = static_cast<scalar_t>(mu[c]);
      var_p[c] = static_cast<scalar_t>(m2[c] / m);
      invstd_p[c] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(var_p[c]) + eps));
      scale[c] = w ? invstd_p[c] * w[c] : invstd_p[c];
      shift[c] = b ? b[c] : scalar_t(0);
    }
    channel_affine<scalar_t>(xp, nullptr, y.data_ptr<scalar_t>(), L, mean_p, scale.data(), shift.data(), nullptr);
  });
  if (running_mean.has_value() && running_mean->defined() && running_var.has_value() && running_var->defined()) {
    at::Tensor rm = *running_mean, rv = *running_var;
    update_running_stats(rm, rv, mean, var, x.numel() / C, momentum);
  }
  return {y, mean, var, invstd};
}

// Training backward: dx (when asked for), dgamma = sum(dy * x_hat), dbeta = sum(dy).
// dx = k * dy + a * (x - mu) + b per channel, with k = gamma * invstd,
// a = -k * invstd^2 * mean(dy * (x - mu)), b = -k * mean(dy).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, bool input_grad) {
  const Layout L = layout_of(x);
  check_dy(dy, x, L);
  check_per_channel(weight, x, "weight");
  const int64_t C = L.channels;
  const double m = static_cast<double>(x.numel() / C);
  at::Tensor dgamma = at::empty({C}, x.options());
  at::Tensor dbeta = at::empty({C}, x.options());
  at::Tensor dx = input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_batch_norm_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* mean_p = mean.data_ptr<scalar_t>();
    const scalar_t* invstd_p = invstd.data_ptr<scalar_t>();
    std::vector<double> sum_dy(C), sum_dy_xc(C);
    backward_sums(xp, dyp, L, mean_p, sum_dy.data(), sum_dy_xc.data());
    const scalar_t* w = optional_data<scalar_t>(weight);
    std::vector<scalar_t> k(C), a(C), b(C);
    for (int64_t c = 0; c < C; ++c) {
      const double inv = invstd_p[c];
      dgamma.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dy_xc[c] * inv);
      dbeta.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(sum_dy[c]);
      const double kc = w ? inv * w[c] : inv;
      const double ac = -kc * inv * inv * (sum_dy_xc[c] / m);
      k[c] = static_cast<scalar_t>(kc);
      a[c] = static_cast<scalar_t>(ac);
      b[c] = static_cast<scalar_t>(-kc * (sum_dy[c] / m));
    }
    if (input_grad) {
      channel_affine<scalar_t>(xp, dyp, dx.data_ptr<scalar_t>(), L, mean_p, a.data(), b.data(), k.data());
    }
  });
  return {dx, dgamma, dbeta};
}

// Eval mode: y = (x - running_mean) * gamma * invstd + beta, with
// invstd = 1 / sqrt(running_var + eps); one pass. Returns y and invstd.
std::tuple<at::Tensor, at::Tensor> batch_norm_eval(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const at::Tensor& running_mean, const at::Tensor& running_var,
                                                   double eps) {
  const Layout L = layout_of(x);
  check_per_channel(weight, x, "weight");
  check_per_channel(bias, x, "bias");
  check_per_channel(running_mean, x, "running_mean");
  check_per_channel(running_var, x, "running_var");
  const int64_t C = L.channels;
  at::Tensor y = at::empty_like(x);
  at::Tensor invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_batch_norm_eval", [&] {
    const scalar_t* w = optional_data<scalar_t>(weight);
    const scalar_t* b = optional_data<scalar_t>(bias);
    const scalar_t* rv = running_var.data_ptr<scalar_t>();
    scalar_t* invstd_p = invstd.data_ptr<scalar_t>();
    std::vector<scalar_t> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
      invstd_p[c] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
      scale[c] = w ? invstd_p[c] * w[c] : invstd_p[c];
      shift[c] = b ? b[c] : scalar_t(0);
    }
    if (x.numel() > 0) {
      channel_affine<scalar_t>(x.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), L,
                               running_mean.data_ptr<scalar_t>(), scale.data(), shift.data(), nullptr);
    }
  });
  return {y, invstd};
}

// The pieces of a training step, for synchronized batch norm
// (bnlib.sync_batchnorm), whose statistics and backward sums must cross
// processes between the passes; the same loops as above, in the order
//   batch_norm_stats -> (collective) -> batch_norm_eval with the global mean, var
//   batch_norm_backward_reduce -> (collective) -> batch_norm_backward_elemt.

// Per-channel mean and M2 = sum((x - mean)^2) of x (one pass, as in the forward).
std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& x) {
  const Layout L = layout_of(x);
  TORCH_CHECK(x.numel() > 0, "bnlib batch norm: empty input");
  const int64_t C = L.channels;
  at::Tensor mean = at::empty({C}, x.options());
  at::Tensor m2 = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_batch_norm_stats", [&] {
    std::vector<double> mu(C), M2(C);
    if (L.rows > 0) {
      row_stats(x.data_ptr<scalar_t>(), L, mu.data(), M2.data());
    } else {
      plane_stats(x.data_ptr<scalar_t>(), L, mu.data(), M2.data());
    }
    for (int64_t c = 0; c < C; ++c) {
      mean.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(mu[c]);
      m2.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(M2[c]);
    }
  });
  return {mean, m2};
}

// The backward's two per-channel sums, sum(dy) and sum(dy * (x - mean)).
std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& mean) {
  const Layout L = layout_of(x);
  check_dy(dy, x, L);
  check_per_channel(mean, x, "mean");
  const int64_t C = L.channels;
  at::Tensor sum_dy = at::empty({C}, x.options());
  at::Tensor sum_dy_xc = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_batch_norm_backward_reduce", [&] {
    std::vector<double> a(C, 0.0), b(C, 0.0);
    if (x.numel() > 0) {
      backward_sums(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), L, mean.data_ptr<scalar_t>(), a.data(),
                    b.data());
    }
    for (int64_t c = 0; c < C; ++c) {
      sum_dy.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(a[c]);
      sum_dy_xc.data_ptr<scalar_t>()[c] = static_cast<scalar_t>(b[c]);
    }
  });
  return {sum_dy, sum_dy_xc};
}

// dx = k * dy + a * (x - mean) + b, per channel: the backward's one
// elementwise pass, with coefficients from the (global) sums.
at::Tensor batch_norm_backward_elemt(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                     const at::Tensor& k, const at::Tensor& a, const at::Tensor& b) {
  const Layout L = layout_of(x);
  check_dy(dy, x, L);
  check_per_channel(mean, x, "mean");
  check_per_channel(k, x, "k");
  check_per_channel(a, x, "a");
  check_per_channel(b, x, "b");
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_batch_norm_backward_elemt", [&] {
    channel_affine<scalar_t>(x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), L,
                             mean.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                             k.data_ptr<scalar_t>());
  });
  return dx;
}


// ---------------------------------------------------------------------------
// Training mode as one autograd op: bnlib_cpu::batch_norm_train
//
// The same forward and backward as functional.py's FusedCPUTrainFunction,
// with autograd's bookkeeping in C++: a Python autograd.Function added 27 to
// 29 us to a forward on (32, 64), where the kernel's call takes 14 to 16 and
// this op's bookkeeping 8 to 9 (bench/results/cpu_dev_machine.md), a visible
// share of a training step on the small batches of the book's experiments. functional.batch_norm_train calls this
// op in eager mode; torch.compile, torch.export, tracing and the torch.func
// transforms keep to the Python Function or the formulas, which they can
// trace (this op has no fake kernel: its autograd kernel reads the data).

// (1, C, 1, ..., 1): a per-channel vector that broadcasts against x.
at::Tensor per_channel_view(const at::Tensor& v, int64_t ndim) {
  std::vector<int64_t> shape(ndim, 1);
  shape[1] = -1;
  return v.view(shape);
}

std::vector<int64_t> stat_dims(int64_t ndim) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < ndim; ++d) dims.push_back(d);
  return dims;
}

// eps as it can be added in x's dtype (float32 or float64): at least the
// dtype's smallest subnormal, as functional._eps_in.
double eps_in(double eps, const at::Tensor& x) {
  return std::max(eps, x.scalar_type() == at::kFloat ? std::numeric_limits<float>::denorm_min()
                                                     : std::numeric_limits<double>::denorm_min());
}

// functional.batch_norm_formula in differentiable ATen ops (x is float32 or
// float64 here; weight and bias, when defined, in x's dtype).
at::Tensor batch_norm_formula(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const auto dims = stat_dims(x.dim());
  at::Tensor x_centered = x - x.mean(dims, /*keepdim=*/true);
  at::Tensor y = x_centered * at::rsqrt(x_centered.square().mean(dims, /*keepdim=*/true) + eps_in(eps, x));
  if (weight.defined()) y = y * per_channel_view(weight, x.dim());
  if (bias.defined()) y = y + per_channel_view(bias, x.dim());
  return y;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A backward asked for a graph (create_graph=True): gradients that can be
// differentiated again, found by autograd through `formula()`, the layer's
// map recomputed in ATen ops from its inputs x, weight and bias (the
// hand-written gradients treat the saved statistics as constants; see
// functional.grads_through_formula). Each goes to its input's place in `out`.
template <typename Formula>
void grads_through_formula(const at::Tensor (&inputs)[3], const at::Tensor& dy, Formula formula, variable_list& out) {
  variable_list wanted;
  std::vector<int64_t> position;
  for (int64_t i = 0; i < 3; ++i) {
    if (inputs[i].defined() && inputs[i].requires_grad()) {
      wanted.push_back(inputs[i]);
      position.push_back(i);
    }
  }
  if (wanted.empty()) return;
  variable_list grads = torch::autograd::grad({formula()}, wanted, {dy}, /*retain_graph=*/true,
                                              /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t j = 0; j < position.size(); ++j) out[position[j]] = grads[j];
}

// The kernels are called through the dispatcher, below autograd, so that
// what watches the dispatcher (a TorchDispatchMode such as bnlib.perf's
// op_traffic, the profiler) sees them as it did under the Python Function.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnlib_cpu::batch_norm_forward", "")
                             .typed<decltype(batch_norm_forward)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, running_mean, running_var, momentum, eps);
}

std::tuple<at::Tensor, at::Tensor> dispatch_eval(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                                 const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                                 const at::Tensor& running_var, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnlib_cpu::batch_norm_eval", "")
                             .typed<decltype(batch_norm_eval)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, running_mean, running_var, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 const c10::optional<at::Tensor>& weight,
                                                                 bool input_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnlib_cpu::batch_norm_backward", "")
                             .typed<decltype(batch_norm_backward)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(dy, x, mean, invstd, weight, input_grad);
}

}  // namespace

// Named, not anonymous: autograd prints the node as
// torch::autograd::CppNode<bnlib_cpu::BatchNormTrain> (y.grad_fn.name()).
namespace bnlib_cpu {

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  // Inputs, in order: x, weight, bias, the running estimates (updated in
  // place when given), momentum, eps. Autograd numbers the tensors given
  // (its "edges"): x is 0, weight 1 when given, bias the next.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var, double momentum, double eps) {
    auto [y, mean, var, invstd] = dispatch_forward(x, weight, bias, running_mean, running_var, momentum, eps);
    ctx->save_for_backward({x, mean, invstd, weight.value_or(at::Tensor()), bias.value_or(at::Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // one per forward input; undefined = no gradient
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &invstd = saved[2], &weight = saved[3], &bias = saved[4];
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      grads_through_formula({x, weight, bias}, dy, [&] { return batch_norm_formula(x, weight, bias, eps); }, out);
      return out;
    }
    const bool dx_wanted = ctx->needs_input_grad(0);
    const bool dweight_wanted = weight.defined() && ctx->needs_input_grad(1);
    const bool dbias_wanted = bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    if (!dy.has_storage()) {
      // A batched dy (autograd.grad(..., is_grads_batched=True)) holds no
      // data to read: the same formulas in ATen ops, which vmap batches.
      const int64_t ndim = x.dim();
      const auto dims = stat_dims(ndim);
      at::Tensor x_hat = (x - per_channel_view(mean, ndim)) * per_channel_view(invstd, ndim);
      if (dx_wanted) {
        at::Tensor k = weight.defined() ? invstd * weight : invstd;
        out[0] = per_channel_view(k, ndim) *
                 (dy - dy.mean(dims, true) - x_hat * (dy * x_hat).mean(dims, true));
      }
      if (dweight_wanted) out[1] = (dy * x_hat).sum(dims);
      if (dbias_wanted) out[2] = dy.sum(dims);
      return out;
    }
    // The kernels read dy in x's memory order.
    const at::Tensor dy_dense = x.is_contiguous() ? dy.contiguous() : dy.contiguous(x.suggest_memory_format());
    c10::optional<at::Tensor> w;
    if (weight.defined()) w = weight;
    auto [dx, dweight, dbias] = dispatch_backward(dy_dense, x, mean, invstd, w, dx_wanted);
    if (dx_wanted) out[0] = dx;
    if (dweight_wanted) out[1] = dweight;
    if (dbias_wanted) out[2] = dbias;
    return out;
  }
};

// Eval mode with grad on: functional.py's BatchNormEvalFunction (a frozen
// network fine-tuned, a gradient taken through a model in eval mode). The
// running estimates are constants, so y is affine in x:
//   dx = dy * scale, scale = gamma * invstd;  dgamma = sum(dy * x_hat);  dbeta = sum(dy)
// in the same ATen ops as the Python Function's backward (the same bits),
// which autograd can differentiate again (create_graph) and vmap batches.
struct BatchNormEval : public torch::autograd::Function<BatchNormEval> {
  // Inputs: x, weight, bias, running_mean, running_var (in x's dtype), eps.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                            const at::Tensor& running_var, double eps) {
    auto [y, invstd] = dispatch_eval(x, weight, bias, running_mean, running_var, eps);
    const at::Tensor w = weight.value_or(at::Tensor());
    // The mean as this forward used it, for dgamma alone: a copy, since the
    // buffer may be updated in place (a training-mode call of the layer)
    // before this backward runs (functional._mean_for_backward).
    const at::Tensor mean = w.defined() && w.requires_grad() ? running_mean.clone() : at::Tensor();
    ctx->save_for_backward({x, mean, invstd, w});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(6);  // one per forward input; undefined = no gradient
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &invstd = saved[2], &weight = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t ndim = x.dim();
    const auto dims = stat_dims(ndim);
    if (ctx->needs_input_grad(0)) {
      at::Tensor dx = dy * per_channel_view(weight.defined() ? invstd * weight : invstd, ndim);
      if (!x.is_contiguous()) {  // dx in x's channels-last layout, as torch's
        const auto format = ndim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
        if (x.is_contiguous(format) && !dx.is_contiguous(format)) dx = dx.contiguous(format);
      }
      out[0] = dx;
    }
    if (weight.defined() && ctx->needs_input_grad(1)) {
      const at::Tensor x_hat = (x - per_channel_view(mean, ndim)) * per_channel_view(invstd, ndim);
      out[1] = (dy * x_hat).sum(dims);
    }
    if (has_bias && ctx->needs_input_grad(weight.defined() ? 2 : 1)) out[2] = dy.sum(dims);
    return out;
  }
};

}  // namespace bnlib_cpu

namespace {

at::Tensor batch_norm_eval_with_grad_autograd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                              const at::Tensor& running_var, double eps) {
  return bnlib_cpu::BatchNormEval::apply(x, weight, bias, running_mean, running_var, eps);
}

at::Tensor batch_norm_eval_with_grad_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                         const at::Tensor& running_var, double eps) {
  return std::get<0>(batch_norm_eval(x, weight, bias, running_mean, running_var, eps));
}

// The op with autograd (the Autograd dispatch key): y, mean, var.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  variable_list out = bnlib_cpu::BatchNormTrain::apply(x, weight, bias, running_mean, running_var, momentum, eps);
  return {out[0], out[1], out[2]};
}

// Below autograd (inference mode, or a caller that excluded it): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double momentum,
    double eps) {
  auto [y, mean, var, invstd] = batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps);
  return {y, mean, var};
}


// ---------------------------------------------------------------------------
// Layer, group and instance norm: the same formulas, per row
//
// bnlib/alternatives.py's GroupedNormFunction normalizes every row of a
// contiguous x viewed as R rows of M values, then y = x_hat * w + b. Value i
// of the flattened x has the parameter k = (i / S) % P: group norm's channel
// (S = the spatial size, P = C; a row is C/G channels of S values; instance
// norm is G = C), or layer norm's element (S = 1, P = M, k = the position in
// the row). So a row is M/S runs of S values, each with one parameter.
// RMS norm (and filter response norm, RMS norm per channel) is the same with
// centered = false: no mean, "var" the mean square, no path through a mean.
//
// Each row is finished before the next: its statistics, then its output,
// from cache when the row fits (as torch's own kernels do), so that
//   forward : read x, write y                                     = 2 |x|
//   backward: read x, dy, write dx                                = 3 |x|
// (a row too long for the cache is read twice: 3 |x| and 5 |x|; three times
// forward where its statistics take a second pass, see row_moments).

struct Rows {
  int64_t R, M, S, P;  // rows, values per row, values per parameter, parameters
};

Rows rows_of(const at::Tensor& x, int64_t rows, int64_t inner, int64_t params) {
  TORCH_CHECK(x.is_contiguous(), "bnlib grouped norm: expected a contiguous input");
  TORCH_CHECK(rows > 0 && x.numel() > 0 && x.numel() % rows == 0, "bnlib grouped norm: ", rows,
              " rows do not divide ", x.numel(), " values");
  const int64_t M = x.numel() / rows;
  TORCH_CHECK(inner > 0 && M % inner == 0 && params > 0 && params % (M / inner) == 0,
              "bnlib grouped norm: a row of ", M, " values is not whole runs of ", inner,
              " values of ", params, " parameters");
  return {rows, M, inner, params};
}

void check_params(const at::Tensor& t, const at::Tensor& x, const Rows& L, const char* name) {
  TORCH_CHECK(t.numel() == L.P && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              "bnlib grouped norm: ", name, " must be a contiguous tensor of ", L.P, " values of the input's dtype");
}

// One row's mean and M2, in one pass over the row when it can: the sums of
// d = x - shift and d^2, whose M2 = sum(d^2) - sum(d)^2 / n is exact in exact
// arithmetic for any shift. In floating point its rounding error grows with
// (mean - shift)^2 / var, so the shift is the mean of the row's first n/64
// values (at least 16): contiguous, they are read anyway, while values spread
// over the row would each cost a cache miss before the row streams in (a third
// of a millisecond per 4096 rows of 1024 floats). If the shift turns out more
// than one standard deviation from the mean (a row whose head is unlike the
// rest: sorted, or a group whose first channel is shifted), the sums are taken
// again, shifted by the mean just found: the two-pass result, at the cost of
// the second pass only where it is needed. A one-pass row's error is thereby
// at most twice the two-pass one. With the extra pass, layer and group
// norm's module forward took 1.2-1.4x torch's time in `make bench`; with one,
// 0.9-1.1x (the op alone 0.7-0.8x torch's op; 4096 x 1024 and
// 64 x 256 x 14 x 14 float32, one thread). Summed in T over runs of
// kBlockBytes, then in double.
template <typename T>
inline void row_moments(const T* x, int64_t n, double& mean, double& m2) {
  const int64_t chunk = std::max<int64_t>(1, kBlockBytes / static_cast<int64_t>(sizeof(T)));
  const int64_t head = std::min<int64_t>(n, std::max<int64_t>(16, n / 64));
  double head_sum = 0;
  for (int64_t j = 0; j < head; ++j) head_sum += x[j];
  T shift = static_cast<T>(head_sum / head);
  for (int pass = 0; pass < 2; ++pass) {
    double s1 = 0, s2 = 0;
    for (int64_t s0 = 0; s0 < n; s0 += chunk) {
      const int64_t len = std::min(chunk, n - s0);
      T a, c;
      shifted_sums(x + s0, len, shift, a, c);
      s1 += a;
      s2 += c;
    }
    const double offset = s1 / n;  // mean - shift
    mean = static_cast<double>(shift) + offset;
    m2 = s2 - s1 * offset;
    // Kept unless offset^2 > var (NaN compares false: a NaN row is kept).
    if (!(offset * offset * n > m2)) return;
    if (pass == 1) {  // the second pass is kept; below 0 only by rounding
      if (m2 < 0) m2 = 0;
      return;
    }
    shift = static_cast<T>(mean);
  }
}

// One row's sum of squares (RMS norm's statistic: no mean is taken): the
// shifted sums with shift 0, summed in T over runs of kBlockBytes, then in
// double.
template <typename T>
inline double row_sum_squares(const T* x, int64_t n) {
  const int64_t chunk = std::max<int64_t>(1, kBlockBytes / static_cast<int64_t>(sizeof(T)));
  double total = 0;
  for (int64_t s0 = 0; s0 < n; s0 += chunk) {
    T sum, sum_squares;
    shifted_sums(x + s0, std::min(chunk, n - s0), T(0), sum, sum_squares);
    total += sum_squares;
  }
  return total;
}

// The forward, row by row: a row's statistics, then, while the row is still
// in cache, y = ((x - mean) * invstd) * w[k] + b[k] (the tensor-op path's
// order of operations, so both round alike). x is read from memory once.
template <typename T>
void grouped_forward(const T* x, T* y, const Rows& L, double eps, bool centered, T* mean, T* var, T* invstd,
                     const T* w, const T* b) {
  const int64_t M = L.M, S = L.S, runs = L.M / L.S;
  const int64_t grain = std::max<int64_t>(1, 32768 / M);
  at::parallel_for(0, L.R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * M;
      T* yr = y + r * M;
      double mu_d = 0, m2;
      if (centered) {
        row_moments(xr, M, mu_d, m2);
      } else {  // RMS norm: "var" is the mean square, "mean" 0
        m2 = row_sum_squares(xr, M);
      }
      // Rounded to T first, then used, as the tensor-op path does: y depends
      // only on what is saved for backward.
      mean[r] = static_cast<T>(mu_d);
      var[r] = static_cast<T>(m2 / M);
      invstd[r] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[r]) + eps));
      const T mu = mean[r], is = invstd[r];
      const int64_t k0 = (r * runs) % L.P;
      if (S == 1) {
        const T* wr = w + k0;
        if (b != nullptr) {
          const T* br = b + k0;
#pragma omp simd
          for (int64_t j = 0; j < M; ++j) yr[j] = ((xr[j] - mu) * is) * wr[j] + br[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < M; ++j) yr[j] = ((xr[j] - mu) * is) * wr[j];
        }
      } else {
        for (int64_t q = 0; q < runs; ++q) {
          const T wk = w[k0 + q];
          const T* xs = xr + q * S;
          T* ys = yr + q * S;
          if (b != nullptr) {
            const T bk = b[k0 + q];
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) ys[s] = ((xs[s] - mu) * is) * wk + bk;
          } else {
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) ys[s] = ((xs[s] - mu) * is) * wk;
          }
        }
      }
    }
  });
}

// sum(g) and sum(g * (x - mu)) over n values, g = dy * w (w: one value, or one
// per value when w_each), summed in T over runs of kBlockBytes, then in double.
template <typename T>
inline void run_sums(const T* dy, const T* x, T mu, const T* w, bool w_each, int64_t n, double& s_g, double& s_gxc) {
  const int64_t chunk = std::max<int64_t>(1, kBlockBytes / static_cast<int64_t>(sizeof(T)));
  for (int64_t s0 = 0; s0 < n; s0 += chunk) {
    const int64_t len = std::min(chunk, n - s0);
    const T* d = dy + s0;
    const T* xp = x + s0;
    T a = 0, c = 0;
    if (w_each) {
      const T* wp = w + s0;
#pragma omp simd reduction(+ : a, c)
      for (int64_t j = 0; j < len; ++j) {
        const T g = d[j] * wp[j];
        a += g;
        c += g * (xp[j] - mu);
      }
    } else {
#pragma omp simd reduction(+ : a, c)
      for (int64_t j = 0; j < len; ++j) {
        a += d[j];
        c += d[j] * (xp[j] - mu);
      }
    }
    s_g += a;
    s_gxc += c;
  }
}

// Per-task partial sums (tasks blocks of P values) added in task order, the
// same order at every thread count, into out (P values).
template <typename A>
void add_task_sums(const std::vector<A>& parts, int64_t tasks, int64_t P, A* out) {
  for (int64_t k = 0; k < P; ++k) {
    A sum = 0;
    for (int64_t t = 0; t < tasks; ++t) sum += parts[t * P + k];
    out[k] = sum;
  }
}

// Rows of the backward per thread: with the parameter gradients, each thread
// sums them into its own buffer of 16 P bytes, kept at most half a float32
// x's size.
inline int64_t grouped_backward_tasks(const Rows& L, bool param_grads) {
  const int64_t tasks = num_tasks(L.R, 1);
  return param_grads ? std::min(tasks, std::max<int64_t>(1, L.R * L.M / (8 * L.P))) : tasks;
}

// At most this many rows in one task sum the parameter gradients in T,
// straight into the outputs (as torch's float32 layer norm does); more rows
// sum them in double (layer norm's per-element ones first in T over
// kStageRows rows). A few long rows (a layer norm over a whole (C, H, W)
// sample) then need no buffer of 16 P bytes, whose fresh pages cost more
// than the pass itself.
constexpr int64_t kFewRows = 8;

// Rows whose per-element dw, db are summed in T before they are added into
// double (layer norm with more rows than kFewRows, or several tasks).
constexpr int64_t kStageRows = 16;

// The backward, row by row: with dx_hat = dy * w[k], x_hat = (x - mu) * invstd,
//   dx = invstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat)),
//   dw[k] = sum(dy * x_hat), db[k] = sum(dy) over the values of parameter k.
// Rows are split among threads; each thread sums dw, db into its own buffer
// in A (double, or T for a single task of at most kFewRows rows; with S == 1,
// a double buffer gets T sums of kStageRows rows at a time), and the
// buffers are added in thread order into dw, db (P values each, zeroed by the
// caller). A single task's buffer is dw, db themselves.
template <typename T, typename A>
void grouped_backward(const T* dy, const T* x, const Rows& L, bool centered, const T* mean, const T* invstd,
                      const T* w, T* dx, A* dw, A* db) {
  const int64_t M = L.M, S = L.S, P = L.P, runs = L.M / L.S;
  const bool param_grads = dw != nullptr;
  const int64_t tasks = grouped_backward_tasks(L, param_grads);
  const bool direct = tasks == 1;  // one task: its buffer is dw, db themselves
  std::vector<A> dw_t(param_grads && !direct ? tasks * P : 0, A(0)), db_t(param_grads && !direct ? tasks * P : 0, A(0));
  // Layer norm's per-element dw, db (S == 1) summed in double cost more than
  // the rest of the backward (1.4 of 2.3 ms for 4096 x 1024 float32): they
  // are summed in T over kStageRows rows, then added into A.
  constexpr bool staged_type = !std::is_same<A, T>::value;
  const bool staged = staged_type && param_grads && S == 1;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> dw_s(staged ? P : 0, T(0)), db_s(staged ? P : 0, T(0));
    for (int64_t t = t0; t < t1; ++t) {
      const auto [r0, r1] = task_range(t, tasks, L.R);
      A* dwp = !param_grads ? nullptr : direct ? dw : dw_t.data() + t * P;
      A* dbp = !param_grads ? nullptr : direct ? db : db_t.data() + t * P;
      // where a row adds its dw, db when S == 1: the stage, or dw, db in T
      T* dwq = nullptr;
      T* dbq = nullptr;
      if (staged) {
        dwq = dw_s.data();
        dbq = db_s.data();
      } else if constexpr (!staged_type) {
        dwq = dwp;
        dbq = dbp;
      }
      int64_t staged_rows = 0;
      auto flush = [&]() {
        for (int64_t k = 0; k < P; ++k) {
          dwp[k] += static_cast<A>(dw_s[k]);
          dbp[k] += static_cast<A>(db_s[k]);
          dw_s[k] = T(0);
          db_s[k] = T(0);
        }
        staged_rows = 0;
      };
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = x + r * M;
        const T* dyr = dy + r * M;
        const T mu = mean[r], is = invstd[r];
        const int64_t k0 = (r * runs) % P;
        double s_g = 0, s_gxc = 0;  // sum(dx_hat), sum(dx_hat * (x - mu))
        if (S == 1) {
          run_sums(dyr, xr, mu, w + k0, true, M, s_g, s_gxc);
          if (param_grads && dx == nullptr) {  // (else summed below, in dx's pass)
            T* dwr = dwq + k0;
            T* dbr = dbq + k0;
#pragma omp simd
            for (int64_t j = 0; j < M; ++j) {
              dwr[j] += dyr[j] * ((xr[j] - mu) * is);
              dbr[j] += dyr[j];
            }
            if (staged && ++staged_rows == kStageRows) flush();
          }
        } else {
          for (int64_t q = 0; q < runs; ++q) {
            double s_dy = 0, s_dyxc = 0;
            run_sums(dyr + q * S, xr + q * S, mu, w, false, S, s_dy, s_dyxc);
            const double wk = static_cast<double>(w[k0 + q]);
            s_g += wk * s_dy;
            s_gxc += wk * s_dyxc;
            if (param_grads) {
              dwp[k0 + q] += static_cast<A>(s_dyxc * static_cast<double>(is));
              dbp[k0 + q] += static_cast<A>(s_dy);
            }
          }
        }
        if (dx == nullptr) continue;
        const T mean_g = centered ? static_cast<T>(s_g / M) : T(0);  // RMS norm: no path through a mean
        const T mean_gxh = static_cast<T>(s_gxc * static_cast<double>(is) / M);
        T* dxr = dx + r * M;
        if (S == 1) {
          const T* wr = w + k0;
          if (param_grads) {  // dw and db in the same pass over the row
            T* dwr = dwq + k0;
            T* dbr = dbq + k0;
#pragma omp simd
            for (int64_t j = 0; j < M; ++j) {
              const T x_hat = (xr[j] - mu) * is;
              dwr[j] += dyr[j] * x_hat;
              dbr[j] += dyr[j];
              dxr[j] = is * ((dyr[j] * wr[j] - mean_g) - x_hat * mean_gxh);
            }
            if (staged && ++staged_rows == kStageRows) flush();
          } else {
#pragma omp simd
            for (int64_t j = 0; j < M; ++j) dxr[j] = is * ((dyr[j] * wr[j] - mean_g) - ((xr[j] - mu) * is) * mean_gxh);
          }
        } else {
          for (int64_t q = 0; q < runs; ++q) {
            const T wk = w[k0 + q];
            const T* xs = xr + q * S;
            const T* dys = dyr + q * S;
            T* dxs = dxr + q * S;
#pragma omp simd
            for (int64_t s = 0; s < S; ++s) dxs[s] = is * ((dys[s] * wk - mean_g) - ((xs[s] - mu) * is) * mean_gxh);
          }
        }
      }
      if (staged && staged_rows > 0) flush();
    }
  });
  if (!param_grads || direct) return;
  add_task_sums(dw_t, tasks, P, dw);
  add_task_sums(db_t, tasks, P, db);
}

// Forward: y, and each row's mean, biased variance and invstd (R values each).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_norm_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t rows, int64_t inner,
    int64_t params, double eps, bool centered) {
  const Rows L = rows_of(x, rows, inner, params);
  check_params(weight, x, L, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_params(*bias, x, L, "bias");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({L.R}, x.options());
  at::Tensor var = at::empty({L.R}, x.options());
  at::Tensor invstd = at::empty({L.R}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_grouped_norm_forward", [&] {
    grouped_forward<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, eps, centered, mean.data_ptr<scalar_t>(),
                              var.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                              has_bias ? bias->data_ptr<scalar_t>() : nullptr);
  });
  return {y, mean, var, invstd};
}

// Sums kept in double, rounded into their output tensor of T (as many values).
template <typename T>
void store_rounded(const std::vector<double>& sums, at::Tensor& out) {
  T* p = out.data_ptr<T>();
  for (size_t k = 0; k < sums.size(); ++k) p[k] = static_cast<T>(sums[k]);
}

// Backward: dx (when input_grad), and dw, db (P values each; when param_grads,
// else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, int64_t inner, bool centered, bool input_grad, bool param_grads) {
  const Rows L = rows_of(x, mean.numel(), inner, weight.numel());
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_contiguous(),
              "bnlib grouped norm backward: dy must be contiguous, with x's shape and dtype");
  TORCH_CHECK(invstd.numel() == L.R && mean.is_contiguous() && invstd.is_contiguous() &&
                  mean.scalar_type() == x.scalar_type() && invstd.scalar_type() == x.scalar_type(),
              "bnlib grouped norm backward: mean and invstd must be contiguous, one value per row");
  check_params(weight, x, L, "weight");
  at::Tensor dx = input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dw = at::empty({param_grads ? L.P : 0}, x.options());
  at::Tensor db = at::empty({param_grads ? L.P : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_grouped_norm_backward", [&] {
    const scalar_t* dy_p = dy.data_ptr<scalar_t>();
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const scalar_t* mean_p = mean.data_ptr<scalar_t>();
    const scalar_t* invstd_p = invstd.data_ptr<scalar_t>();
    const scalar_t* w_p = weight.data_ptr<scalar_t>();
    scalar_t* dx_p = input_grad ? dx.data_ptr<scalar_t>() : nullptr;
    if (!param_grads) {
      grouped_backward<scalar_t, double>(dy_p, x_p, L, centered, mean_p, invstd_p, w_p, dx_p, nullptr, nullptr);
    } else if (grouped_backward_tasks(L, true) == 1 && L.R <= kFewRows) {  // in T, into dw and db
      dw.zero_();
      db.zero_();
      grouped_backward<scalar_t, scalar_t>(dy_p, x_p, L, centered, mean_p, invstd_p, w_p, dx_p,
                                           dw.data_ptr<scalar_t>(), db.data_ptr<scalar_t>());
    } else {  // in double, then rounded to T
      std::vector<double> dw_d(L.P, 0.0), db_d(L.P, 0.0);
      grouped_backward<scalar_t, double>(dy_p, x_p, L, centered, mean_p, invstd_p, w_p, dx_p, dw_d.data(), db_d.data());
      store_rounded<scalar_t>(dw_d, dw);
      store_rounded<scalar_t>(db_d, db);
    }
  });
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------
// Group norm (and instance norm, and filter response norm, centered = false)
// on a channels-last input, without copying it to (N, C, S...) order first.
// A sample is S positions of C channels, in memory an (S, C) matrix; group g
// of sample n (row n * G + g of the loops above, so the statistics come out
// in the same order) is its Cg = C / G columns g * Cg ... The loops walk each
// sample in memory order, summing per channel (a vector along C), and fold
// the channel sums into their group's. Each sample is finished before the
// next, from cache when it fits (a sample of (64, 32, 32) float32 is 256 KiB):
//   forward : read x (shifted sums), then x, write y  = 2 |x| from memory
//   backward: read x, dy (sums), then x, dy, write dx = 3 |x| from memory
// The forward sums each channel's values as d = x - shift, the shift the
// mean of the channel's first positions (a 64th of the sample, at least one
// block), in one pass (a second one for the channels whose shift proves over
// a standard deviation off), and merges the channels into their group with
// Chan's formula. The output is (x - mean) * (invstd * w) + b, within a
// rounding of grouped_forward's; the backward uses grouped_backward's
// formulas and roundings, only the order of the sums differing.

struct Samples {
  int64_t N, S, C, G;  // samples, positions per sample, channels, groups
};

Samples samples_of(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(channels_last_contiguous(x), "bnlib grouped norm (channels last): expected a channels-last input");
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(x.numel() > 0, "bnlib grouped norm (channels last): expected a non-empty input");
  TORCH_CHECK(groups > 0 && C % groups == 0, "bnlib grouped norm (channels last): ", groups,
              " groups do not divide ", C, " channels");
  return {N, x.numel() / (N * C), C, groups};
}

// Positions summed in T before their sums are added into double: about
// kBlockBytes of the sample at a time, and at most 256 (each channel's sum in
// T is one running sum, whose rounding grows with its length: with 2
// channels, 4096 positions a block left the variance 3e-5 off, 1000 times
// the contiguous loops' error).
inline int64_t positions_per_block(int64_t C, int64_t bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(256, kBlockBytes / (C * bytes)));
}

template <typename T>
void grouped_forward_cl(const T* x, T* y, const Samples& L, double eps, bool centered, T* mean, T* var, T* invstd,
                        const T* w, const T* b) {
  const int64_t S = L.S, C = L.C, G = L.G, Cg = L.C / L.G, count = L.S * Cg;
  const int64_t block = positions_per_block(C, sizeof(T));
  const int64_t lead = std::min(S, std::max(block, (S + 63) / 64));  // positions that set the shifts
  at::parallel_for(0, L.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<double> s1(C), s2(C);
    std::vector<T> acc1(C), acc2(C), shift(C), mu(C), is(C);
    T* a1 = acc1.data();
    T* a2 = acc2.data();
    const T* sh = shift.data();
    const T* m = mu.data();
    const T* v = is.data();
    for (int64_t n = n0; n < n1; ++n) {
      const T* xn = x + n * S * C;
      T* yn = y + n * S * C;
      // The shift of each channel: the mean of its first `lead` positions
      // (RMS norm: 0, the sums of squares), summed as differences from the
      // first position's value (a float32 running sum of the values
      // themselves, 4096 of them near 3e6, rounds by units and put the shift
      // hundreds of standard deviations off). With lead >= S / 64 the shift is
      // within sqrt(S / lead) <= 8 standard deviations of the channel's mean,
      // so the shifted sums below lose at most 64x in M2, not |mean|^2 / var;
      // a channel whose shift is still over one standard deviation off (its
      // head unlike the rest) has its sums taken again, as row_moments does.
      std::fill(shift.begin(), shift.end(), T(0));
      if (centered) {
        std::fill(s1.begin(), s1.end(), 0.0);
        for (int64_t p0 = 0; p0 < lead; p0 += block) {
          std::fill(acc1.begin(), acc1.end(), T(0));
          for (int64_t p = p0; p < std::min(lead, p0 + block); ++p) {
            const T* xp = xn + p * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) a1[c] += xp[c] - xn[c];
          }
          for (int64_t c = 0; c < C; ++c) s1[c] += acc1[c];
        }
        for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<T>(xn[c] + s1[c] / lead);
      }
      for (int pass = 0; pass < 2; ++pass) {
        // One pass: sum(d) and sum(d^2) per channel, d = x - shift[c]
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        for (int64_t p0 = 0; p0 < S; p0 += block) {
          std::fill(acc1.begin(), acc1.end(), T(0));
          std::fill(acc2.begin(), acc2.end(), T(0));
          for (int64_t p = p0; p < std::min(S, p0 + block); ++p) {
            const T* xp = xn + p * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T d = xp[c] - sh[c];
              a1[c] += d;
              a2[c] += d * d;
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            s1[c] += acc1[c];
            s2[c] += acc2[c];
          }
        }
        if (!centered || pass == 1) break;
        bool again = false;
        for (int64_t c = 0; c < C; ++c) {
          const double offset = s1[c] / S;  // the channel's mean - shift
          if (offset * offset * S > s2[c] - s1[c] * offset) {  // offset^2 > var (NaN: false)
            again = true;
            shift[c] = static_cast<T>(static_cast<double>(shift[c]) + offset);
          }
        }
        if (!again) break;
      }
      // Each group from its channels' summaries (S values each, in double):
      // mean = the channels' mean; M2 = sum of the channels' M2 plus
      // S * sum (mean_c - mean)^2, Chan's merge for equal counts.
      for (int64_t g = 0; g < G; ++g) {
        double mean_g = 0, m2 = 0;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          mean_g += static_cast<double>(shift[c]) + s1[c] / S;
        }
        mean_g /= Cg;
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const double mean_c = static_cast<double>(shift[c]) + s1[c] / S;
          m2 += centered ? (s2[c] - s1[c] * s1[c] / S) + S * (mean_c - mean_g) * (mean_c - mean_g) : s2[c];
        }
        if (m2 < 0) m2 = 0;  // rounding; a NaN stays
        const int64_t r = n * G + g;
        // rounded to T, then used, as in grouped_forward
        mean[r] = centered ? static_cast<T>(mean_g) : T(0);
        var[r] = static_cast<T>(m2 / count);
        invstd[r] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(var[r]) + eps));
        std::fill(mu.begin() + g * Cg, mu.begin() + (g + 1) * Cg, mean[r]);
        std::fill(is.begin() + g * Cg, is.begin() + (g + 1) * Cg, invstd[r]);
      }
      // Then y = (x - mean) * (invstd * w[c]) + b[c]: one multiplication and
      // one load less per value than grouped_forward's ((x - mean) * invstd)
      // * w[c], whose order the tensor ops share; y is within a rounding of
      // theirs. (GroupNorm(8, 64) on (64, 64, 32, 32): 1.25x torch's forward
      // op -> 1.02x, one thread.)
      for (int64_t c = 0; c < C; ++c) is[c] = is[c] * w[c];
      for (int64_t p = 0; p < S; ++p) {
        const T* xp = xn + p * C;
        T* yp = yn + p * C;
        if (b != nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) yp[c] = (xp[c] - m[c]) * v[c] + b[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) yp[c] = (xp[c] - m[c]) * v[c];
        }
      }
    }
  });
}

// The backward of grouped_forward_cl: grouped_backward's formulas, with per
// channel sums of dy and dy * (x - mean) folded into the groups'.
template <typename T>
void grouped_backward_cl(const T* dy, const T* x, const Samples& L, bool centered, const T* mean, const T* invstd,
                         const T* w, T* dx, double* dw, double* db) {
  const int64_t S = L.S, C = L.C, G = L.G, Cg = L.C / L.G, count = L.S * Cg;
  const int64_t block = positions_per_block(C, sizeof(T));
  const bool param_grads = dw != nullptr;
  const int64_t tasks = num_tasks(L.N, 1);
  std::vector<double> dw_t(param_grads ? tasks * C : 0, 0.0), db_t(param_grads ? tasks * C : 0, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> s_dy(C), s_dyxc(C);
    std::vector<T> acc1(C), acc2(C), mu(C), is(C), mean_g(C), mean_gxh(C);
    T* a1 = acc1.data();
    T* a2 = acc2.data();
    const T* m = mu.data();
    const T* v = is.data();
    const T* mg = mean_g.data();
    const T* mgx = mean_gxh.data();
    for (int64_t t = t0; t < t1; ++t) {
      const auto [first, last] = task_range(t, tasks, L.N);
      for (int64_t n = first; n < last; ++n) {
        const T* xn = x + n * S * C;
        const T* dyn = dy + n * S * C;
        for (int64_t g = 0; g < G; ++g) {
          std::fill(mu.begin() + g * Cg, mu.begin() + (g + 1) * Cg, mean[n * G + g]);
          std::fill(is.begin() + g * Cg, is.begin() + (g + 1) * Cg, invstd[n * G + g]);
        }
        std::fill(s_dy.begin(), s_dy.end(), 0.0);
        std::fill(s_dyxc.begin(), s_dyxc.end(), 0.0);
        for (int64_t p0 = 0; p0 < S; p0 += block) {
          std::fill(acc1.begin(), acc1.end(), T(0));
          std::fill(acc2.begin(), acc2.end(), T(0));
          for (int64_t p = p0; p < std::min(S, p0 + block); ++p) {
            const T* xp = xn + p * C;
            const T* dyp = dyn + p * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              a1[c] += dyp[c];
              a2[c] += dyp[c] * (xp[c] - m[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            s_dy[c] += acc1[c];
            s_dyxc[c] += acc2[c];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          const double is_g = static_cast<double>(invstd[n * G + g]);
          double s_g = 0, s_gxc = 0;  // sum(dx_hat), sum(dx_hat * (x - mu)), dx_hat = dy * w
          for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
            const double wc = static_cast<double>(w[c]);
            s_g += wc * s_dy[c];
            s_gxc += wc * s_dyxc[c];
            if (param_grads) {
              dw_t[t * C + c] += s_dyxc[c] * is_g;
              db_t[t * C + c] += s_dy[c];
            }
          }
          std::fill(mean_g.begin() + g * Cg, mean_g.begin() + (g + 1) * Cg,
                    centered ? static_cast<T>(s_g / count) : T(0));
          std::fill(mean_gxh.begin() + g * Cg, mean_gxh.begin() + (g + 1) * Cg,
                    static_cast<T>(s_gxc * is_g / count));
        }
        if (dx == nullptr) continue;
        T* dxn = dx + n * S * C;
        for (int64_t p = 0; p < S; ++p) {
          const T* xp = xn + p * C;
          const T* dyp = dyn + p * C;
          T* dxp = dxn + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) dxp[c] = v[c] * ((dyp[c] * w[c] - mg[c]) - ((xp[c] - m[c]) * v[c]) * mgx[c]);
        }
      }
    }
  });
  if (!param_grads) return;
  add_task_sums(dw_t, tasks, C, dw);
  add_task_sums(db_t, tasks, C, db);
}

// Forward on a channels-last x: y (channels last), and each row's mean,
// biased variance and invstd (N * groups values each, row n * groups + g).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_norm_forward_cl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t groups, double eps,
    bool centered) {
  const Samples L = samples_of(x, groups);
  check_per_channel(weight, x, "weight");
  check_per_channel(bias, x, "bias");
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = at::empty_like(x);  // (keeps x's channels-last strides)
  at::Tensor mean = at::empty({L.N * L.G}, x.options());
  at::Tensor var = at::empty({L.N * L.G}, x.options());
  at::Tensor invstd = at::empty({L.N * L.G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_grouped_norm_forward_cl", [&] {
    grouped_forward_cl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, eps, centered,
                                 mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(),
                                 weight.data_ptr<scalar_t>(), has_bias ? bias->data_ptr<scalar_t>() : nullptr);
  });
  return {y, mean, var, invstd};
}

// Backward on channels-last x and dy: dx (channels last, when input_grad),
// and dw, db (C values each; when param_grads, else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_norm_backward_cl(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, bool centered, bool input_grad, bool param_grads) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) > 0 && mean.numel() % x.size(0) == 0,
              "bnlib grouped norm backward (channels last): mean must have a whole number of values per sample");
  const Samples L = samples_of(x, mean.numel() / x.size(0));
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && channels_last_contiguous(dy),
              "bnlib grouped norm backward (channels last): dy must be channels last, with x's shape and dtype");
  TORCH_CHECK(invstd.numel() == mean.numel() && mean.is_contiguous() && invstd.is_contiguous() &&
                  mean.scalar_type() == x.scalar_type() && invstd.scalar_type() == x.scalar_type(),
              "bnlib grouped norm backward (channels last): mean and invstd must be contiguous, one value per row");
  check_per_channel(weight, x, "weight");
  at::Tensor dx = input_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dw = at::empty({param_grads ? L.C : 0}, x.options());
  at::Tensor db = at::empty({param_grads ? L.C : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlib_grouped_norm_backward_cl", [&] {
    std::vector<double> dw_d(param_grads ? L.C : 0), db_d(param_grads ? L.C : 0);
    grouped_backward_cl<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), L, centered,
                                  mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                  input_grad ? dx.data_ptr<scalar_t>() : nullptr,
                                  param_grads ? dw_d.data() : nullptr, param_grads ? db_d.data() : nullptr);
    if (param_grads) {
      store_rounded<scalar_t>(dw_d, dw);
      store_rounded<scalar_t>(db_d, db);
    }
  });
  return {dx, dw, db};
}


// ---------------------------------------------------------------------------
// Layer, group, instance and RMS norm as one autograd op: grouped_norm_train
//
// What alternatives.py's GroupedNormFunction and RMSNormFunction do on these
// loops (contiguous rows; channels-last inputs keep the Python Functions),
// with autograd's bookkeeping in C++, as batch_norm_train does for batch norm.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_grouped_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t rows, int64_t inner,
    int64_t params, double eps, bool centered) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnlib_cpu::grouped_norm_forward", "")
                             .typed<decltype(grouped_norm_forward)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, rows, inner, params, eps, centered);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_grouped_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, int64_t inner, bool centered, bool input_grad, bool param_grads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bnlib_cpu::grouped_norm_backward", "")
                             .typed<decltype(grouped_norm_backward)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(dy, x, mean, invstd, weight, inner, centered, input_grad, param_grads);
}

// A parameter as the loops take it: `params` contiguous values (ones for none).
at::Tensor param_values(const at::Tensor& param, int64_t params, const at::Tensor& x) {
  if (!param.defined()) return at::ones({params}, x.options());
  return param.reshape({-1}).contiguous();
}

// grouped_norm_forward with the layer's weight and bias (undefined when
// absent) turned into the values the loops take.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_forward_of_layer(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t rows, int64_t inner, int64_t params,
    double eps, bool centered) {
  c10::optional<at::Tensor> bias_values;
  if (bias.defined()) bias_values = param_values(bias, params, x);
  return dispatch_grouped_forward(x, param_values(weight, params, x), bias_values, rows, inner, params, eps, centered);
}

// x viewed as (-1, params, inner): value i's parameter is (i / inner) % params,
// the loops' rule, so a parameter viewed as (1, params, 1) broadcasts to it.
at::Tensor by_param(const at::Tensor& t, int64_t params, int64_t inner) { return t.reshape({-1, params, inner}); }

// The map in differentiable ATen ops (alternatives._grouped_norm_formula and
// _rms_norm_formula): each of the `rows` rows normalized (centered, or
// divided by its root mean square), then times weight, plus bias.
at::Tensor grouped_formula(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t rows,
                           int64_t inner, int64_t params, double eps, bool centered) {
  at::Tensor r = x.reshape({rows, -1});
  if (centered) {
    at::Tensor mu = r.mean(-1, /*keepdim=*/true);
    r = r - (mu + (r - mu).mean(-1, /*keepdim=*/true));  // alternatives._row_mean's corrected mean
  }
  at::Tensor y = by_param(r * at::rsqrt(r.square().mean(-1, /*keepdim=*/true) + eps_in(eps, x)), params, inner);
  if (weight.defined()) y = y * weight.reshape({1, params, 1});
  if (bias.defined()) y = y + bias.reshape({1, params, 1});
  return y.reshape(x.sizes());
}

}  // namespace

namespace bnlib_cpu {

struct GroupedNormTrain : public torch::autograd::Function<GroupedNormTrain> {
  // Inputs: x (contiguous), weight, bias (any shape of `params` values, in
  // x's dtype), then rows, inner, params, eps, centered (see grouped_norm_forward).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, int64_t rows, int64_t inner, int64_t params,
                               double eps, bool centered) {
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    auto [y, mean, var, invstd] = grouped_forward_of_layer(x, w, b, rows, inner, params, eps, centered);
    ctx->save_for_backward({x, mean, invstd, w, b});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["inner"] = inner;
    ctx->saved_data["params"] = params;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["centered"] = centered;
    ctx->mark_non_differentiable({mean, var});
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);  // one per forward input; undefined = no gradient
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &invstd = saved[2], &weight = saved[3], &bias = saved[4];
    const int64_t rows = ctx->saved_data["rows"].toInt(), inner = ctx->saved_data["inner"].toInt();
    const int64_t params = ctx->saved_data["params"].toInt();
    const bool centered = ctx->saved_data["centered"].toBool();
    if (at::GradMode::is_enabled()) {
      const double eps = ctx->saved_data["eps"].toDouble();
      grads_through_formula(
          {x, weight, bias}, dy, [&] { return grouped_formula(x, weight, bias, rows, inner, params, eps, centered); },
          out);
      return out;
    }
    const bool dx_wanted = ctx->needs_input_grad(0);
    const bool dweight_wanted = weight.defined() && ctx->needs_input_grad(1);
    const bool dbias_wanted = bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    if (!dy.has_storage()) {
      // A batched dy (is_grads_batched=True): the formulas in ATen ops, which
      // vmap batches (alternatives._rows_backward, without the mean's term
      // when not centered).
      at::Tensor x_rows = x.reshape({rows, -1});
      if (centered) x_rows = x_rows - mean.view({rows, 1});
      const at::Tensor x_hat = x_rows * invstd.view({rows, 1});
      const at::Tensor dy_by_param = by_param(dy, params, inner);
      const at::Tensor x_hat_by_param = by_param(x_hat, params, inner);
      if (dx_wanted) {
        at::Tensor dx_hat = weight.defined() ? dy_by_param * weight.reshape({1, params, 1}) : dy_by_param;
        dx_hat = dx_hat.reshape({rows, -1});
        at::Tensor inner_term = dx_hat - x_hat * (dx_hat * x_hat).mean(-1, true);
        if (centered) inner_term = inner_term - dx_hat.mean(-1, true);
        out[0] = (invstd.view({rows, 1}) * inner_term).reshape(x.sizes());
      }
      // (a named vector: torch 2.4's headers find sum({0, 2}) ambiguous)
      const std::vector<int64_t> outside_params{0, 2};
      if (dweight_wanted) out[1] = (dy_by_param * x_hat_by_param).sum(outside_params).reshape(weight.sizes());
      if (dbias_wanted) out[2] = dy_by_param.sum(outside_params).reshape(bias.sizes());
      return out;
    }
    const bool param_grads = dweight_wanted || dbias_wanted;
    auto [dx, dw, db] = dispatch_grouped_backward(dy.contiguous(), x, mean, invstd, param_values(weight, params, x),
                                                  inner, centered, dx_wanted, param_grads);
    if (dx_wanted) out[0] = dx;
    if (dweight_wanted) out[1] = dw.view(weight.sizes());
    if (dbias_wanted) out[2] = db.view(bias.sizes());
    return out;
  }
};

}  // namespace bnlib_cpu

namespace {

// The op with autograd (the Autograd dispatch key): y, and each row's mean and var.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_norm_train_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t rows, int64_t inner, int64_t params, double eps, bool centered) {
  variable_list out = bnlib_cpu::GroupedNormTrain::apply(x, weight, bias, rows, inner, params, eps, centered);
  return {out[0], out[1], out[2]};
}

// Below autograd: the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_norm_train_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t rows, int64_t inner, int64_t params, double eps, bool centered) {
  auto [y, mean, var, invstd] = grouped_forward_of_layer(x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                                                         rows, inner, params, eps, centered);
  return {y, mean, var};
}

}  // namespace

TORCH_LIBRARY(bnlib_cpu, m) {
  m.def(
      "batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var,"
      " float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, bool input_grad)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps)"
      " -> (Tensor, Tensor)");
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, SymInt m,"
      " float momentum) -> ()");
  m.def(
      "batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var,"
      " float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_eval_with_grad(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var,"
      " float eps) -> Tensor");
  m.def("batch_norm_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("batch_norm_backward_reduce(Tensor dy, Tensor x, Tensor mean) -> (Tensor, Tensor)");
  m.def("batch_norm_backward_elemt(Tensor dy, Tensor x, Tensor mean, Tensor k, Tensor a, Tensor b) -> Tensor");
  m.def(
      "grouped_norm_forward(Tensor x, Tensor weight, Tensor? bias, SymInt rows, SymInt inner, SymInt params, float eps,"
      " bool centered) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "grouped_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor weight, SymInt inner,"
      " bool centered, bool input_grad, bool param_grads) -> (Tensor, Tensor, Tensor)");
  m.def(
      "grouped_norm_train(Tensor x, Tensor? weight, Tensor? bias, SymInt rows, SymInt inner, SymInt params, float eps,"
      " bool centered) -> (Tensor, Tensor, Tensor)");
  m.def(
      "grouped_norm_forward_cl(Tensor x, Tensor weight, Tensor? bias, SymInt groups, float eps, bool centered)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "grouped_norm_backward_cl(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor weight, bool centered,"
      " bool input_grad, bool param_grads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlib_cpu, CPU, m) {
  m.impl("batch_norm_forward", &batch_norm_forward);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_eval_with_grad", &batch_norm_eval_with_grad_cpu);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
  m.impl("grouped_norm_forward", &grouped_norm_forward);
  m.impl("grouped_norm_backward", &grouped_norm_backward);
  m.impl("grouped_norm_train", &grouped_norm_train_cpu);
  m.impl("grouped_norm_forward_cl", &grouped_norm_forward_cl);
  m.impl("grouped_norm_backward_cl", &grouped_norm_backward_cl);
}

TORCH_LIBRARY_IMPL(bnlib_cpu, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_eval_with_grad", &batch_norm_eval_with_grad_autograd);
  m.impl("grouped_norm_train", &grouped_norm_train_autograd);
}
