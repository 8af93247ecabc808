// Fused clip-and-noise ops: schemas (TORCH_LIBRARY) and the CPU kernels.
//
//   torchdp_keras::clipped_sum(Tensor[] grads, float l2_norm_clip)
//       -> (Tensor[] sums, Tensor squared_norms)
//   torchdp_keras::add_noise_and_scale_(Tensor(a!)[] tensors, float noise_std,
//       float scale, int seed, int offset) -> ()
//   torchdp_keras::clip_and_noise(Tensor[] grads, float l2_norm_clip,
//       float noise_std, int seed, int offset) -> Tensor[]
//
// grads[k] has shape (B, ...); example i's norm is taken over row i of every
// tensor together. When an example's rows and a sum (as large) fit in one
// core's L2 cache together, the CPU clipped sum reads each example once from
// memory: each thread takes a range of examples, their norms and their
// clipped sum into a sum of its own (no barrier: see clipped_sum_one_read),
// and the threads' sums are added in a fixed order. Larger examples take two
// reads, the floor for them: the norms, then one gemv.
// Noise number n of a call is philox_normal(seed, offset + n), n running over
// the elements of the tensors in order (see clip_noise.h): the same on CPU
// and CUDA.

#include <torch/extension.h>

#include <ATen/Config.h>
#include <ATen/Parallel.h>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "clip_noise.h"

namespace torchdp_keras {
namespace {

void check_grads(at::TensorList grads, double l2_norm_clip, const char* op) {
  TORCH_CHECK(!grads.empty(), op, ": expected at least one gradient tensor. Received: grads=[]");
  TORCH_CHECK(l2_norm_clip > 0 && std::isfinite(l2_norm_clip), op,
              ": expected l2_norm_clip > 0 and finite. Received: l2_norm_clip=", l2_norm_clip);
  const auto batch = grads[0].dim() > 0 ? grads[0].size(0) : -1;
  for (size_t k = 0; k < grads.size(); ++k) {
    const auto& g = grads[k];
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == batch, op,
                ": expected every gradient to have the batch of grads[0] (", batch,
                ") on axis 0. Received: grads[", k, "].shape=", g.sizes());
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), op,
                ": expected one dtype for all gradients. Received: grads[", k,
                "].dtype=", g.scalar_type(), " and grads[0].dtype=", grads[0].scalar_type());
    TORCH_CHECK(g.device() == grads[0].device(), op,
                ": expected one device for all gradients. Received: grads[", k, "] on ",
                g.device(), " and grads[0] on ", grads[0].device());
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, op,
                ": expected float32 or float64 gradients. Received: dtype=", g.scalar_type());
  }
}

void check_noise(double noise_std, int64_t seed, int64_t offset, const char* op) {
  TORCH_CHECK(noise_std >= 0 && std::isfinite(noise_std), op,
              ": expected noise_std >= 0 and finite. Received: noise_std=", noise_std);
  TORCH_CHECK(offset >= 0, op, ": expected offset >= 0. Received: offset=", offset);
  (void)seed;  // any 64-bit value is a key
}

// The hot loops, built for several instruction sets on x86-64 and chosen at
// load time by the CPU (neither target brings FMA, and nothing here is
// contracted, so every clone rounds alike). The memory-bound loops stop at
// AVX2; the noise generator, which is compute-bound, also gets AVX-512.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TDK_CLONES __attribute__((target_clones("avx2", "default")))
#define TDK_NOISE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TDK_CLONES
#define TDK_NOISE_CLONES
#endif

// Squared norm of one row, accumulated in double over four lanes.
template <typename scalar_t>
inline double squared_norm_loop(const scalar_t* row, int64_t width) {
  double partial[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t j = 0;
  for (; j + 4 <= width; j += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      const double v = static_cast<double>(row[j + lane]);
      partial[lane] += v * v;
    }
  }
  for (; j < width; ++j) {
    const double v = static_cast<double>(row[j]);
    partial[0] += v * v;
  }
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

// float32 rows: sums of squares of 8 values in float (relative error about
// 10 roundings, 6e-7, below the clip margin, as ops.clip_noise.squared_row_norms),
// the blocks summed in double. 32 float lanes (four vector registers) per block
// of 256 values, so that consecutive additions do not wait on each other; the
// last < 256 values are summed in double.
TDK_CLONES double squared_norm_f32(const float* row, int64_t width) {
  constexpr int kLanes = 32;
  double partial[kLanes] = {};
  int64_t j = 0;
  for (; j + 8 * kLanes <= width; j += 8 * kLanes) {
    float block[kLanes] = {};
    for (int step = 0; step < 8; ++step) {
      for (int lane = 0; lane < kLanes; ++lane) {
        const float v = row[j + step * kLanes + lane];
        block[lane] += v * v;
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) partial[lane] += static_cast<double>(block[lane]);
  }
  double total = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) total += partial[lane];
  return total + squared_norm_loop(row + j, width - j);
}
TDK_CLONES double squared_norm_f64(const double* row, int64_t width) {
  return squared_norm_loop(row, width);
}
TDK_CLONES void axpy_f32(float* acc, const float* row, float factor, int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] += factor * row[j];
}
TDK_CLONES void axpy_f64(double* acc, const double* row, double factor, int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] += factor * row[j];
}

// acc += f[0] * rows[0] + ... + f[n-1] * rows[n-1] (n <= 4), added one row after
// the other for every element: the same roundings as n calls of axpy, with one
// pass over acc instead of n.
template <typename scalar_t>
inline void axpy_rows_loop(scalar_t* acc, const scalar_t* const* rows, const scalar_t* f, int n,
                           int64_t width) {
  if (n == 4) {
    const scalar_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3];
    for (int64_t j = 0; j < width; ++j) {
      acc[j] = (((acc[j] + f[0] * r0[j]) + f[1] * r1[j]) + f[2] * r2[j]) + f[3] * r3[j];
    }
  } else if (n == 2) {
    const scalar_t *r0 = rows[0], *r1 = rows[1];
    for (int64_t j = 0; j < width; ++j) acc[j] = (acc[j] + f[0] * r0[j]) + f[1] * r1[j];
  } else {
    for (int k = 0; k < n; ++k) {
      const scalar_t* r = rows[k];
      for (int64_t j = 0; j < width; ++j) acc[j] += f[k] * r[j];
    }
  }
}
TDK_CLONES void axpy_rows_f32(float* acc, const float* const* rows, const float* f, int n,
                              int64_t width) {
  axpy_rows_loop(acc, rows, f, n, width);
}
TDK_CLONES void axpy_rows_f64(double* acc, const double* const* rows, const double* f, int n,
                              int64_t width) {
  axpy_rows_loop(acc, rows, f, n, width);
}
inline void axpy_rows(float* acc, const float* const* rows, const float* f, int n, int64_t width) {
  axpy_rows_f32(acc, rows, f, n, width);
}
inline void axpy_rows(double* acc, const double* const* rows, const double* f, int n,
                      int64_t width) {
  axpy_rows_f64(acc, rows, f, n, width);
}

inline double squared_norm(const float* row, int64_t width) { return squared_norm_f32(row, width); }
inline double squared_norm(const double* row, int64_t width) {
  return squared_norm_f64(row, width);
}
inline void axpy(float* acc, const float* row, float factor, int64_t width) {
  axpy_f32(acc, row, factor, width);
}
inline void axpy(double* acc, const double* row, double factor, int64_t width) {
  axpy_f64(acc, row, factor, width);
}

// Size in bytes of one instance of the level-`level` data cache of CPU 0, as
// Linux reports it (sysfs: the per-instance size, right in virtual machines,
// where sysconf can report a whole socket's L3), else sysconf for L2, else
// `fallback`.
int64_t cache_bytes(int level, int64_t fallback) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    int found = 0;
    char type[32] = {0};
    long long size = 0;
    char unit = 0;
    if (FILE* f = std::fopen((dir + "/level").c_str(), "r")) {
      if (std::fscanf(f, "%d", &found) != 1) found = 0;
      std::fclose(f);
    }
    if (found != level) continue;
    if (FILE* f = std::fopen((dir + "/type").c_str(), "r")) {
      if (std::fscanf(f, "%31s", type) != 1) type[0] = 0;
      std::fclose(f);
    }
    if (std::string(type) == "Instruction") continue;
    if (FILE* f = std::fopen((dir + "/size").c_str(), "r")) {
      if (std::fscanf(f, "%lld%c", &size, &unit) < 1) size = 0;
      std::fclose(f);
    }
    if (unit == 'K') size <<= 10;
    if (unit == 'M') size <<= 20;
    if (size > 0) return static_cast<int64_t>(size);
  }
#ifdef _SC_LEVEL2_CACHE_SIZE
  if (level == 2) {
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (size > 0) return static_cast<int64_t>(size);
  }
#endif
  return fallback;
}

// One core's L2 cache (0 if unknown), read once.
int64_t l2_cache_bytes() {
  static const int64_t size = cache_bytes(2, 0);
  return size;
}

template <typename scalar_t>
double row_squared_norm(const std::vector<at::Tensor>& rows, int64_t i) {
  double total = 0.0;
  for (const auto& t : rows) {
    const int64_t width = t.size(1);
    total += squared_norm(t.data_ptr<scalar_t>() + i * width, width);
  }
  return total;
}

// One read of each example, without a barrier: worker w owns a contiguous
// range of examples and a sum of its own (worker 0 writes into the output
// sums, the others into private buffers). For each of its examples it takes
// the squared norm (the rows come into its cache) and adds factor * rows into
// its sum while they are still there. The sums are then added in worker
// order, a column range per thread: the result depends only on the number of
// workers, never on timing. Nothing waits inside the loop, so a worker that
// the OS deschedules (another busy process on the machine) delays only its
// own range, as it would in any parallel torch op; the former design's
// barrier per group of examples made every worker wait, spinning, for the
// slowest at every group (0.25x of torch under load).
// CPUs this process may run on: its affinity mask on Linux, else all.
int64_t usable_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, CPU_COUNT(&set));
  }
#endif
  return std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
}

template <typename scalar_t>
void clipped_sum_one_read(const std::vector<at::Tensor>& rows, double l2_norm_clip,
                          std::vector<at::Tensor>& sums, double* norms) {
  const int64_t batch = rows[0].size(0);
  std::vector<const scalar_t*> data;
  std::vector<int64_t> widths;
  int64_t columns = 0;
  for (size_t k = 0; k < rows.size(); ++k) {
    data.push_back(rows[k].data_ptr<scalar_t>());
    widths.push_back(rows[k].size(1));
    columns += rows[k].size(1);
  }
  // At most one worker per thread, per CPU the process may run on and per
  // 8 examples (a private sum costs a read and a write of P values).
  const int64_t workers = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(at::get_num_threads()), usable_cpus(), batch / 8}));
  // sums[k] for worker 0; one zeroed buffer of all the columns per other worker.
  std::vector<scalar_t> buffers(static_cast<size_t>((workers - 1) * columns), scalar_t(0));
  auto target = [&](int64_t w, size_t k, int64_t offset) -> scalar_t* {
    if (w == 0) return sums[k].data_ptr<scalar_t>();
    return buffers.data() + (w - 1) * columns + offset;
  };
  std::vector<int64_t> offsets(rows.size(), 0);
  for (size_t k = 1; k < rows.size(); ++k) offsets[k] = offsets[k - 1] + widths[k - 1];
  // Examples are added a block at a time (up to 4 whose rows fit in half of
  // the L2 together): one pass over the sum per block, not per example.
  const int64_t row_bytes = columns * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t l2 = l2_cache_bytes() > 0 ? l2_cache_bytes() : int64_t{256} << 10;
  const int block = row_bytes * 4 <= l2 / 2 ? 4 : (row_bytes * 2 <= l2 / 2 ? 2 : 1);
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const int64_t begin = batch * w / workers, end = batch * (w + 1) / workers;
      for (int64_t i0 = begin; i0 < end; i0 += block) {
        const int n = static_cast<int>(std::min<int64_t>(block, end - i0));
        scalar_t factors[4];
        for (int e = 0; e < n; ++e) {
          double total = 0.0;
          for (size_t k = 0; k < rows.size(); ++k) {
            total += squared_norm(data[k] + (i0 + e) * widths[k], widths[k]);
          }
          norms[i0 + e] = total;
          factors[e] = static_cast<scalar_t>(clip_factor(total, l2_norm_clip));
        }
        for (size_t k = 0; k < rows.size(); ++k) {
          const scalar_t* block_rows[4];
          for (int e = 0; e < n; ++e) block_rows[e] = data[k] + (i0 + e) * widths[k];
          axpy_rows(target(w, k, offsets[k]), block_rows, factors, n, widths[k]);
        }
      }
    }
  });
  if (workers == 1) return;
  // Sum the private buffers into the output, in worker order, by column ranges.
  at::parallel_for(0, columns, 4096, [&](int64_t begin, int64_t end) {
    for (size_t k = 0; k < rows.size(); ++k) {
      const int64_t lo = std::max(begin, offsets[k]), hi = std::min(end, offsets[k] + widths[k]);
      if (lo >= hi) continue;
      scalar_t* out = sums[k].data_ptr<scalar_t>() + (lo - offsets[k]);
      for (int64_t w = 1; w < workers; ++w) {
        axpy(out, buffers.data() + (w - 1) * columns + lo, scalar_t(1), hi - lo);
      }
    }
  });
}

// Two reads (an example's rows are too large to stay in cache): the norms,
// then the weighted sum as a matrix-vector product (the BLAS gemv reads the
// gradients once, in the order memory likes).
template <typename scalar_t>
void clipped_sum_two_reads(const std::vector<at::Tensor>& rows, double l2_norm_clip,
                           std::vector<at::Tensor>& sums, double* norms) {
  const int64_t batch = rows[0].size(0);
  auto factors = at::empty({batch}, rows[0].options());
  scalar_t* f = factors.data_ptr<scalar_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      norms[i] = row_squared_norm<scalar_t>(rows, i);
      f[i] = static_cast<scalar_t>(clip_factor(norms[i], l2_norm_clip));
    }
  });
  for (size_t k = 0; k < rows.size(); ++k) {
    sums.push_back(at::mv(rows[k].t(), factors));
  }
}

// Rows of at most this many bytes per example take the one-read kernel: an
// example's rows and the worker's sum (as large) must both stay in that
// core's L2 cache while the example is added, so a quarter of it each (64 KiB
// if the L2 size is unknown). Larger examples take two reads, as fast as the
// best torch formulation and never slower: the one-read kernel would stream
// its sum through memory for every example.
int64_t one_read_bytes() {
  static const int64_t limit = [] {
    const int64_t l2 = l2_cache_bytes();
    return l2 > 0 ? l2 / 4 : int64_t{64} << 10;
  }();
  return limit;
}

// Stream normals 2 * first .. 2 * (first + pairs) - 1 into normals[]: one
// Philox call, one log and one sincos per pair, written in bit operations and
// selects (clip_noise.h) so that this loop vectorises. Its own function (not
// inlined into the caller) so that each clone vectorises it for its target.
TDK_NOISE_CLONES void normal_pairs(uint64_t seed, uint64_t first, int64_t pairs,
                                   double* normals) {
#pragma omp simd
  for (int64_t k = 0; k < pairs; ++k) {
    philox_normal_pair(seed, first + static_cast<uint64_t>(k), &normals[2 * k],
                       &normals[2 * k + 1]);
  }
}

template <typename scalar_t>
void add_noise_and_scale_kernel(scalar_t* data, int64_t numel, double noise_std, double scale,
                                uint64_t seed, uint64_t first) {
  if (noise_std == 0.0) {
    at::parallel_for(0, numel, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        data[j] = static_cast<scalar_t>(static_cast<double>(data[j]) * scale);
      }
    });
    return;
  }
  // One Philox call, one log and one sincos per pair of stream numbers,
  // computed a block at a time by the vectorised normal_pairs.
  constexpr int64_t kPairs = 256;
  at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    double normals[2 * kPairs];
    int64_t j = begin;
    while (j < end) {
      const uint64_t n = first + static_cast<uint64_t>(j);
      const uint64_t pair = n >> 1;
      const int64_t skip = static_cast<int64_t>(n & 1);  // start mid-pair
      const int64_t take = std::min<int64_t>(end - j, 2 * kPairs - skip);
      const int64_t pairs = (skip + take + 1) / 2;
      normal_pairs(seed, pair, pairs, normals);
      for (int64_t k = 0; k < take; ++k) {
        data[j + k] = static_cast<scalar_t>(
            (static_cast<double>(data[j + k]) + noise_std * normals[skip + k]) * scale);
      }
      j += take;
    }
  });
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> clipped_sum_cpu(at::TensorList grads,
                                                                double l2_norm_clip) {
  check_grads(grads, l2_norm_clip, "torchdp_keras.clipped_sum");
  const int64_t batch = grads[0].size(0);
  std::vector<at::Tensor> rows;
  rows.reserve(grads.size());
  for (const auto& g : grads) {
    rows.push_back(g.reshape({batch, -1}).contiguous());
  }
  auto squared_norms = at::empty({batch}, grads[0].options().dtype(at::kDouble));
  int64_t row_bytes = 0;
  for (const auto& r : rows) {
    row_bytes += r.size(1) * static_cast<int64_t>(r.element_size());
  }
  std::vector<at::Tensor> sums;
  if (row_bytes <= one_read_bytes()) {
    for (const auto& r : rows) {
      sums.push_back(at::zeros({r.size(1)}, r.options()));
    }
    AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "clipped_sum_cpu", [&] {
      clipped_sum_one_read<scalar_t>(rows, l2_norm_clip, sums, squared_norms.data_ptr<double>());
    });
    for (size_t k = 0; k < grads.size(); ++k) {
      sums[k] = sums[k].reshape(grads[k].sizes().slice(1));
    }
  } else {
    std::vector<at::Tensor> flat;
    AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "clipped_sum_cpu", [&] {
      clipped_sum_two_reads<scalar_t>(rows, l2_norm_clip, flat, squared_norms.data_ptr<double>());
    });
    for (size_t k = 0; k < grads.size(); ++k) {
      sums.push_back(flat[k].reshape(grads[k].sizes().slice(1)));
    }
  }
  return {sums, squared_norms};
}

void add_noise_and_scale_cpu(at::TensorList tensors, double noise_std, double scale, int64_t seed,
                             int64_t offset) {
  check_noise(noise_std, seed, offset, "torchdp_keras.add_noise_and_scale_");
  uint64_t first = static_cast<uint64_t>(offset);
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto& t = tensors[k];
    TORCH_CHECK(t.is_contiguous(), "torchdp_keras.add_noise_and_scale_: expected contiguous "
                "tensors. Received: tensors[", k, "] with strides ", t.strides());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "torchdp_keras.add_noise_and_scale_: expected float32 or float64 tensors. "
                "Received: tensors[", k, "].dtype=", t.scalar_type());
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "add_noise_and_scale_cpu", [&] {
      add_noise_and_scale_kernel<scalar_t>(t.data_ptr<scalar_t>(), t.numel(), noise_std, scale,
                                           static_cast<uint64_t>(seed), first);
    });
    first += static_cast<uint64_t>(t.numel());
  }
}

std::vector<at::Tensor> clip_and_noise_cpu(at::TensorList grads, double l2_norm_clip,
                                           double noise_std, int64_t seed, int64_t offset) {
  check_noise(noise_std, seed, offset, "torchdp_keras.clip_and_noise");
  auto sums = std::get<0>(clipped_sum_cpu(grads, l2_norm_clip));
  add_noise_and_scale_cpu(sums, noise_std, 1.0, seed, offset);
  return sums;
}

TORCH_LIBRARY(torchdp_keras, m) {
  m.def("clipped_sum(Tensor[] grads, float l2_norm_clip) -> (Tensor[], Tensor)");
  m.def(
      "add_noise_and_scale_(Tensor(a!)[] tensors, float noise_std, float scale, int seed, "
      "int offset) -> ()");
  m.def(
      "clip_and_noise(Tensor[] grads, float l2_norm_clip, float noise_std, int seed, "
      "int offset) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(torchdp_keras, CPU, m) {
  m.impl("clipped_sum", &clipped_sum_cpu);
  m.impl("add_noise_and_scale_", &add_noise_and_scale_cpu);
  m.impl("clip_and_noise", &clip_and_noise_cpu);
}

}  // namespace torchdp_keras

// Importing the module registers the ops above (torch.ops.torchdp_keras.*).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "torchdp_keras fused clip-and-noise ops (registered in torch.ops.torchdp_keras)";
  module.def("cpu_one_read_bytes", &torchdp_keras::one_read_bytes,
             "Largest example (bytes, all its rows) the CPU clipped sum reads once.");
  module.def("cpu_l2_bytes", &torchdp_keras::l2_cache_bytes,
             "One core's L2 cache in bytes as the CPU kernel sees it (0 if unknown).");
}
