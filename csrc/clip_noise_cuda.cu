// CUDA kernels of the fused clip-and-noise ops (schemas in clip_noise_cpu.cpp).
//
// clipped_sum: per gradient tensor, one kernel adds each example's squared
// norm (double, block reduction, one atomicAdd per block and example), one
// kernel turns norms into clip factors, and one kernel forms
// sum_i factor_i * g_i[p] for every position p (threads over p, a loop over
// examples: coalesced reads). add_noise_and_scale_: one kernel per tensor;
// thread t computes the pair of stream numbers 2c, 2c + 1 (c = offset / 2 + t)
// with philox_normal_pair from clip_noise.h, the same bits as the CPU kernel (this file is compiled with -fmad=false).
// All on the current stream, 64-bit indexing, every launch checked.

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "clip_noise.h"

namespace torchdp_keras {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n, int64_t per_block = kThreads) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks);
}

template <typename scalar_t>
__global__ void squared_norms_kernel(const scalar_t* __restrict__ rows, int64_t batch,
                                     int64_t width, double* __restrict__ norms) {
  __shared__ double partial[kThreads];
  for (int64_t example = blockIdx.y; example < batch; example += gridDim.y) {
    const scalar_t* row = rows + example * width;
    double total = 0.0;
    for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < width;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const double v = static_cast<double>(row[j]);
      total += v * v;
    }
    partial[threadIdx.x] = total;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        partial[threadIdx.x] += partial[threadIdx.x + stride];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      atomicAdd(norms + example, partial[0]);
    }
    __syncthreads();
  }
}

__global__ void clip_factors_kernel(const double* __restrict__ norms, int64_t batch,
                                    double l2_norm_clip, double* __restrict__ factors) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < batch) {
    factors[i] = clip_factor(norms[i], l2_norm_clip);
  }
}

template <typename scalar_t>
__global__ void weighted_sum_kernel(const scalar_t* __restrict__ rows, int64_t batch,
                                    int64_t width, const double* __restrict__ factors,
                                    scalar_t* __restrict__ out) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < width;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double total = 0.0;
    for (int64_t i = 0; i < batch; ++i) {
      total += factors[i] * static_cast<double>(rows[i * width + p]);
    }
    out[p] = static_cast<scalar_t>(total);
  }
}

template <typename scalar_t>
__global__ void add_noise_and_scale_kernel(scalar_t* __restrict__ data, int64_t numel,
                                           double noise_std, double scale, uint64_t seed,
                                           uint64_t first) {
  // Thread t takes stream pair (first / 2 + t): numbers 2c and 2c + 1, the
  // elements n - first of this tensor that they cover.
  const uint64_t first_pair = first >> 1;
  const uint64_t last = first + static_cast<uint64_t>(numel);  // exclusive
  const int64_t pairs = static_cast<int64_t>(((last + 1) >> 1) - first_pair);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < pairs;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t pair = first_pair + static_cast<uint64_t>(t);
    double even = 0.0, odd = 0.0;
    if (noise_std != 0.0) {
      philox_normal_pair(seed, pair, &even, &odd);
    }
    const uint64_t n0 = pair << 1;
    if (n0 >= first && n0 < last) {
      const int64_t j = static_cast<int64_t>(n0 - first);
      data[j] = static_cast<scalar_t>((static_cast<double>(data[j]) + noise_std * even) * scale);
    }
    if (n0 + 1 >= first && n0 + 1 < last) {
      const int64_t j = static_cast<int64_t>(n0 + 1 - first);
      data[j] = static_cast<scalar_t>((static_cast<double>(data[j]) + noise_std * odd) * scale);
    }
  }
}

void check_cuda_inputs(at::TensorList tensors, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": expected at least one tensor. Received: []");
  for (size_t k = 0; k < tensors.size(); ++k) {
    TORCH_CHECK(tensors[k].is_cuda(), op, ": expected CUDA tensors. Received: tensors[", k,
                "] on ", tensors[k].device());
    TORCH_CHECK(tensors[k].device() == tensors[0].device(), op,
                ": expected one device. Received: tensors[", k, "] on ", tensors[k].device(),
                " and tensors[0] on ", tensors[0].device());
    TORCH_CHECK(tensors[k].scalar_type() == at::kFloat || tensors[k].scalar_type() == at::kDouble,
                op, ": expected float32 or float64. Received: tensors[", k,
                "].dtype=", tensors[k].scalar_type());
  }
}

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor> clipped_sum_cuda(at::TensorList grads,
                                                                 double l2_norm_clip) {
  check_cuda_inputs(grads, "torchdp_keras.clipped_sum");
  TORCH_CHECK(l2_norm_clip > 0 && std::isfinite(l2_norm_clip),
              "torchdp_keras.clipped_sum: expected l2_norm_clip > 0 and finite. Received: "
              "l2_norm_clip=", l2_norm_clip);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = grads[0].size(0);
  std::vector<at::Tensor> rows;
  for (size_t k = 0; k < grads.size(); ++k) {
    TORCH_CHECK(grads[k].dim() >= 1 && grads[k].size(0) == batch,
                "torchdp_keras.clipped_sum: expected every gradient to have the batch of "
                "grads[0] (", batch, ") on axis 0. Received: grads[", k, "].shape=",
                grads[k].sizes());
    TORCH_CHECK(grads[k].scalar_type() == grads[0].scalar_type(),
                "torchdp_keras.clipped_sum: expected one dtype for all gradients");
    rows.push_back(grads[k].reshape({batch, -1}).contiguous());
  }
  auto norms = at::zeros({batch}, grads[0].options().dtype(at::kDouble));
  auto factors = at::empty({batch}, norms.options());
  std::vector<at::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES(grads[0].scalar_type(), "clipped_sum_cuda", [&] {
    for (const auto& r : rows) {
      const int64_t width = r.size(1);
      if (width == 0 || batch == 0) continue;
      const dim3 grid(static_cast<unsigned>(blocks_for(width, kThreads * 8)),
                      static_cast<unsigned>(batch < 65535 ? batch : 65535));
      squared_norms_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          r.data_ptr<scalar_t>(), batch, width, norms.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    clip_factors_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(
        norms.data_ptr<double>(), batch, l2_norm_clip, factors.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (size_t k = 0; k < rows.size(); ++k) {
      const int64_t width = rows[k].size(1);
      auto out = at::zeros({width}, rows[k].options());
      if (width > 0 && batch > 0) {
        weighted_sum_kernel<scalar_t><<<blocks_for(width), kThreads, 0, stream>>>(
            rows[k].data_ptr<scalar_t>(), batch, width, factors.data_ptr<double>(),
            out.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      sums.push_back(out.reshape(grads[k].sizes().slice(1)));
    }
  });
  return {sums, norms};
}

void add_noise_and_scale_cuda(at::TensorList tensors, double noise_std, double scale,
                              int64_t seed, int64_t offset) {
  check_cuda_inputs(tensors, "torchdp_keras.add_noise_and_scale_");
  TORCH_CHECK(noise_std >= 0 && std::isfinite(noise_std),
              "torchdp_keras.add_noise_and_scale_: expected noise_std >= 0 and finite. "
              "Received: noise_std=", noise_std);
  TORCH_CHECK(offset >= 0, "torchdp_keras.add_noise_and_scale_: expected offset >= 0. "
              "Received: offset=", offset);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  uint64_t first = static_cast<uint64_t>(offset);
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto& t = tensors[k];
    TORCH_CHECK(t.is_contiguous(), "torchdp_keras.add_noise_and_scale_: expected contiguous "
                "tensors. Received: tensors[", k, "] with strides ", t.strides());
    const int64_t numel = t.numel();
    if (numel > 0) {
      AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "add_noise_and_scale_cuda", [&] {
        add_noise_and_scale_kernel<scalar_t><<<blocks_for(numel / 2 + 1), kThreads, 0, stream>>>(
            t.data_ptr<scalar_t>(), numel, noise_std, scale, static_cast<uint64_t>(seed), first);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    first += static_cast<uint64_t>(numel);
  }
}

std::vector<at::Tensor> clip_and_noise_cuda(at::TensorList grads, double l2_norm_clip,
                                            double noise_std, int64_t seed, int64_t offset) {
  auto sums = std::get<0>(clipped_sum_cuda(grads, l2_norm_clip));
  add_noise_and_scale_cuda(sums, noise_std, 1.0, seed, offset);
  return sums;
}

TORCH_LIBRARY_IMPL(torchdp_keras, CUDA, m) {
  m.impl("clipped_sum", &clipped_sum_cuda);
  m.impl("add_noise_and_scale_", &add_noise_and_scale_cuda);
  m.impl("clip_and_noise", &clip_and_noise_cuda);
}

}  // namespace torchdp_keras
