// Multi-scale deformable attention: CUDA entry points (see ms_deform_attn_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace chatterbox_msda {

// value [N,S,M,D] (fp32/fp16/bf16/fp64), spatial_shapes [L,2] int64 (H,W), level_start_index [L] int64,
// sampling_locations [N,Lq,M,L,P,2] and attention_weights [N,Lq,M,L,P] in fp32 (fp64 for fp64 values).
// channels_per_thread: 0 picks automatically; 1/2/4/8 force a vector width (benchmarking).
// Returns [N,Lq,M*D] in value's dtype.
at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   int64_t channels_per_thread);

// Returns {grad_value (value's dtype), grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const at::Tensor& grad_output,
                                 int64_t channels_per_thread);

}  // namespace chatterbox_msda
