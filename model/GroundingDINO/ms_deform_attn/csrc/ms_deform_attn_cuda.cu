// Multi-scale deformable attention, forward and backward CUDA kernels.
//
// Work layout: one *group* of G lanes (G a power of two <= 32, lanes of one warp) per (batch, query, head)
// "task" in the forward and per (task, level) in the backward; each lane owns VEC consecutive channels (a
// packed load of up to 16 bytes), so a corner's D channels are read by one coalesced access of the group. Bilinear corner offsets and weights are computed once per
// sampling point per lane, and the backward reduces the location/weight gradients over channels with warp
// shuffles inside the group: no shared memory, no block-level reductions, no im2col batching.
// Accumulation is in fp32 (fp64 for fp64 inputs); value gradients of fp16/bf16 inputs are accumulated with
// fp32 atomics into a scratch buffer and rounded once at the end.
#include "ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

namespace chatterbox_msda {
namespace {

constexpr int kThreadsPerBlock = 256;

template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};

// VEC channels moved as one aligned load/store.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* ptr, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(pack.v[i]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* ptr, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(ptr) = pack;
}

// Adds VEC consecutive fp32 gradients; Hopper has native 8/16-byte float atomics in global memory.
template <int VEC>
__device__ __forceinline__ void atomic_add_pack(float* ptr, const float (&v)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kWideAtomics = true;
#else
  constexpr bool kWideAtomics = false;
#endif
  if constexpr (kWideAtomics && VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      atomicAdd(reinterpret_cast<float4*>(ptr + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
  } else if constexpr (kWideAtomics && VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(ptr), make_float2(v[0], v[1]));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) atomicAdd(ptr + i, v[i]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_pack(double* ptr, const double (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(ptr + i, v[i]);
}

// The four bilinear corners of one sampling point on one level (align_corners=False, zero padding).
// Corner order: (top,left), (top,right), (bottom,left), (bottom,right).
template <typename acc_t>
struct Corners {
  int64_t offset[4];  // element offset of the corner's channel 0 relative to the (batch, head) base
  acc_t weight[4];
  bool valid[4];
  acc_t frac_h, frac_w;  // distance of the point from the top/left corner, in cells
};

// False when the point is so far outside the map that no corner contributes.
template <typename acc_t>
__device__ __forceinline__ bool locate(acc_t x, acc_t y, int height, int width, int64_t level_start,
                                       int64_t token_stride, Corners<acc_t>& c) {
  const acc_t h_im = y * height - acc_t(0.5);
  const acc_t w_im = x * width - acc_t(0.5);
  if (!(h_im > acc_t(-1) && w_im > acc_t(-1) && h_im < acc_t(height) && w_im < acc_t(width))) return false;
  const int h_low = static_cast<int>(floor(h_im));
  const int w_low = static_cast<int>(floor(w_im));
  c.frac_h = h_im - h_low;
  c.frac_w = w_im - w_low;
  const acc_t rest_h = acc_t(1) - c.frac_h, rest_w = acc_t(1) - c.frac_w;
  const bool top = h_low >= 0, bottom = h_low + 1 < height, left = w_low >= 0, right = w_low + 1 < width;
  c.valid[0] = top && left;
  c.valid[1] = top && right;
  c.valid[2] = bottom && left;
  c.valid[3] = bottom && right;
  c.weight[0] = rest_h * rest_w;
  c.weight[1] = rest_h * c.frac_w;
  c.weight[2] = c.frac_h * rest_w;
  c.weight[3] = c.frac_h * c.frac_w;
  c.offset[0] = (level_start + static_cast<int64_t>(h_low) * width + w_low) * token_stride;
  c.offset[1] = c.offset[0] + token_stride;
  c.offset[2] = c.offset[0] + static_cast<int64_t>(width) * token_stride;
  c.offset[3] = c.offset[2] + token_stride;
  return true;
}

// VEC channels from ``channel`` on of the four corners; corners outside the map read as zero.
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_corners(const scalar_t* value_base, const Corners<acc_t>& corners, int channel,
                                             acc_t (&v)[4][VEC]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (corners.valid[k]) {
      load_pack<VEC>(value_base + corners.offset[k] + channel, v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = acc_t(0);
    }
  }
}

struct Problem {
  int64_t num_tasks;  // N * Lq * M
  int64_t num_value_tokens;  // S
  int num_queries, num_heads, head_dim, num_levels, num_points;
  int log2_group;
};

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                   const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ sampling_locations,
                   const acc_t* __restrict__ attention_weights, scalar_t* __restrict__ output, const Problem pb) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t task = thread >> pb.log2_group;  // (batch * Lq + query) * M + head
  if (task >= pb.num_tasks) return;              // groups are aligned, so a whole group leaves together
  const int group = 1 << pb.log2_group;
  const int lane = static_cast<int>(thread & (group - 1));
  const int head = static_cast<int>(task % pb.num_heads);
  const int64_t batch = task / pb.num_heads / pb.num_queries;
  const int64_t token_stride = static_cast<int64_t>(pb.num_heads) * pb.head_dim;
  const scalar_t* value_base = value + batch * pb.num_value_tokens * token_stride + static_cast<int64_t>(head) * pb.head_dim;
  const int points_per_task = pb.num_levels * pb.num_points;
  const acc_t* locations = sampling_locations + task * points_per_task * 2;
  const acc_t* weights = attention_weights + task * points_per_task;

  for (int channel = lane * VEC; channel < pb.head_dim; channel += group * VEC) {
    acc_t acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = acc_t(0);
    for (int level = 0; level < pb.num_levels; ++level) {
      const int height = static_cast<int>(spatial_shapes[2 * level]);
      const int width = static_cast<int>(spatial_shapes[2 * level + 1]);
      const int64_t start = level_start_index[level];
      if (start < 0 || start + static_cast<int64_t>(height) * width > pb.num_value_tokens) {
        // A level that does not fit in value: poison the result instead of reading out of bounds.
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = std::numeric_limits<acc_t>::quiet_NaN();
        break;
      }
      for (int point = 0; point < pb.num_points; ++point) {
        const int idx = level * pb.num_points + point;
        Corners<acc_t> corners;
        if (!locate(locations[2 * idx], locations[2 * idx + 1], height, width, start, token_stride, corners)) continue;
        const acc_t weight = weights[idx];
        acc_t v[4][VEC];
        load_corners<VEC>(value_base, corners, channel, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc_t w = weight * corners.weight[k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += w * v[k][i];
        }
      }
    }
    store_pack<VEC>(output + task * pb.head_dim + channel, acc);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                    const int64_t* __restrict__ level_start_index, const acc_t* __restrict__ sampling_locations,
                    const acc_t* __restrict__ attention_weights, const scalar_t* __restrict__ grad_output,
                    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_locations,
                    acc_t* __restrict__ grad_weights, const Problem pb) {
  // One group per (task, level): the gradients of different points are independent, and splitting by
  // level gives the small decoder problems (Lq = 900) enough parallelism to fill the GPU.
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t unit = thread >> pb.log2_group;
  if (unit >= pb.num_tasks * pb.num_levels) return;
  const int64_t task = unit / pb.num_levels;
  const int level = static_cast<int>(unit % pb.num_levels);
  const int group = 1 << pb.log2_group;
  const int lane = static_cast<int>(thread & (group - 1));
  const int warp_lane = threadIdx.x & 31;
  const unsigned group_mask =
      group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (warp_lane & ~(group - 1)));
  const int head = static_cast<int>(task % pb.num_heads);
  const int64_t batch = task / pb.num_heads / pb.num_queries;
  const int64_t token_stride = static_cast<int64_t>(pb.num_heads) * pb.head_dim;
  const int64_t base = batch * pb.num_value_tokens * token_stride + static_cast<int64_t>(head) * pb.head_dim;
  const scalar_t* value_base = value + base;
  acc_t* grad_value_base = grad_value + base;
  const scalar_t* grad_out = grad_output + task * pb.head_dim;
  const int points_per_task = pb.num_levels * pb.num_points;
  const acc_t* locations = sampling_locations + task * points_per_task * 2;
  const acc_t* weights = attention_weights + task * points_per_task;
  acc_t* task_grad_locations = grad_locations + task * points_per_task * 2;
  acc_t* task_grad_weights = grad_weights + task * points_per_task;

  {
    const int height = static_cast<int>(spatial_shapes[2 * level]);
    const int width = static_cast<int>(spatial_shapes[2 * level + 1]);
    const int64_t start = level_start_index[level];
    const bool level_fits = start >= 0 && start + static_cast<int64_t>(height) * width <= pb.num_value_tokens;
    for (int point = 0; point < pb.num_points; ++point) {
      const int idx = level * pb.num_points + point;
      const acc_t x = locations[2 * idx], y = locations[2 * idx + 1];
      const acc_t weight = weights[idx];
      // Per-lane partial sums over its channels of: d/d(weight), d/d(w_im), d/d(h_im) (before scaling).
      acc_t grad_w = 0, grad_col = 0, grad_row = 0;
      Corners<acc_t> corners;
      // `inside` is the same for every lane of the group, so the shuffles below see the whole group.
      const bool inside = level_fits && locate(x, y, height, width, start, token_stride, corners);
      if (inside) {
        const acc_t rest_h = acc_t(1) - corners.frac_h, rest_w = acc_t(1) - corners.frac_w;
        for (int channel = lane * VEC; channel < pb.head_dim; channel += group * VEC) {
          acc_t go[VEC];
          load_pack<VEC>(grad_out + channel, go);
          acc_t v[4][VEC];
          load_corners<VEC>(value_base, corners, channel, v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const acc_t sampled = corners.weight[0] * v[0][i] + corners.weight[1] * v[1][i] +
                                  corners.weight[2] * v[2][i] + corners.weight[3] * v[3][i];
            grad_w += go[i] * sampled;
            grad_col += go[i] * (rest_h * (v[1][i] - v[0][i]) + corners.frac_h * (v[3][i] - v[2][i]));
            grad_row += go[i] * (rest_w * (v[2][i] - v[0][i]) + corners.frac_w * (v[3][i] - v[1][i]));
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!corners.valid[k]) continue;
            const acc_t scale = weight * corners.weight[k];
            acc_t contribution[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) contribution[i] = scale * go[i];
            atomic_add_pack<VEC>(grad_value_base + corners.offset[k] + channel, contribution);
          }
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        if (offset >= group) continue;
        grad_w += __shfl_xor_sync(group_mask, grad_w, offset, group);
        grad_col += __shfl_xor_sync(group_mask, grad_col, offset, group);
        grad_row += __shfl_xor_sync(group_mask, grad_row, offset, group);
      }
      if (lane == 0) {
        if (level_fits) {
          task_grad_weights[idx] = grad_w;
          task_grad_locations[2 * idx] = grad_col * weight * width;
          task_grad_locations[2 * idx + 1] = grad_row * weight * height;
        } else {
          const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
          task_grad_weights[idx] = nan;
          task_grad_locations[2 * idx] = nan;
          task_grad_locations[2 * idx + 1] = nan;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side

struct Sizes {
  int64_t batch, tokens, heads, head_dim, queries, levels, points;
};

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const char* where = "ms_deform_attn (CUDA)";
  TORCH_CHECK(value.is_cuda(), where, ": value must be a CUDA tensor");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), where, ": all inputs must be on ", value.device());
    TORCH_CHECK(t->is_contiguous(), where, ": inputs must be contiguous");
  }
  TORCH_CHECK(value.is_contiguous(), where, ": value must be contiguous");
  TORCH_CHECK(value.dim() == 4, where, ": value must be [N,S,M,D], got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, where, ": spatial_shapes must be [L,2]");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong, where,
              ": spatial_shapes and level_start_index must be int64");
  const auto coord_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sampling_locations.scalar_type() == coord_type && attention_weights.scalar_type() == coord_type, where,
              ": sampling_locations and attention_weights must be ", coord_type, " for ", value.scalar_type(),
              " values");
  Sizes s{value.size(0), value.size(1), value.size(2), value.size(3), 0, spatial_shapes.size(0), 0};
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels, where,
              ": level_start_index must be [L]");
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(0) == s.batch &&
                  sampling_locations.size(2) == s.heads && sampling_locations.size(3) == s.levels &&
                  sampling_locations.size(5) == 2,
              where, ": sampling_locations must be [N,Lq,M,L,P,2], got ", sampling_locations.sizes());
  s.queries = sampling_locations.size(1);
  s.points = sampling_locations.size(4);
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), where,
              ": attention_weights must be [N,Lq,M,L,P], got ", attention_weights.sizes());
  TORCH_CHECK(s.head_dim <= std::numeric_limits<int>::max() / 2 && s.queries <= std::numeric_limits<int>::max(),
              where, ": sizes too large");
  return s;
}

bool pack_fits(int vec, int64_t head_dim, size_t element_size, std::initializer_list<const void*> pointers) {
  if (vec * element_size > 16 || head_dim % vec != 0) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % (vec * element_size) != 0) return false;
  return true;
}

// Channels per lane: the widest allowed pack up to `preferred`, or exactly `requested` when given.
int choose_vec(int64_t requested, int preferred, int64_t head_dim, size_t element_size,
               std::initializer_list<const void*> pointers) {
  if (requested > 0) {
    TORCH_CHECK(requested == 1 || requested == 2 || requested == 4 || requested == 8,
                "ms_deform_attn (CUDA): channels_per_thread must be 0, 1, 2, 4 or 8");
    TORCH_CHECK(pack_fits(static_cast<int>(requested), head_dim, element_size, pointers),
                "ms_deform_attn (CUDA): channels_per_thread=", requested, " does not fit head_dim=", head_dim,
                " / alignment");
    return static_cast<int>(requested);
  }
  for (int vec = preferred; vec > 1; vec /= 2)
    if (pack_fits(vec, head_dim, element_size, pointers)) return vec;
  return 1;
}

template <typename scalar_t>
int preferred_vec() {
  // Up to 4 channels (and 16 bytes) per lane: fewer lanes per task amortise the per-point index and
  // weight arithmetic; wider packs (8 bf16) were slower in the backward (docs/BENCHMARKS.md).
  return sizeof(scalar_t) >= 8 ? 2 : 4;
}

Problem make_problem(const Sizes& s, int vec) {
  Problem pb;
  pb.num_tasks = s.batch * s.queries * s.heads;
  pb.num_value_tokens = s.tokens;
  pb.num_queries = static_cast<int>(s.queries);
  pb.num_heads = static_cast<int>(s.heads);
  pb.head_dim = static_cast<int>(s.head_dim);
  pb.num_levels = static_cast<int>(s.levels);
  pb.num_points = static_cast<int>(s.points);
  const int64_t lanes_needed = (s.head_dim + vec - 1) / vec;
  int log2_group = 0;
  while ((1 << log2_group) < lanes_needed && log2_group < 5) ++log2_group;
  pb.log2_group = log2_group;
  return pb;
}

int64_t num_blocks(int64_t num_groups, int log2_group) {
  return ((num_groups << log2_group) + kThreadsPerBlock - 1) / kThreadsPerBlock;
}

// Calls fn(std::integral_constant<int, VEC>) for the packs that exist for scalar_t (at most 16 bytes).
template <typename scalar_t, typename Fn>
void with_vec(int vec, Fn&& fn) {
  switch (vec) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (sizeof(scalar_t) * 2 <= 16) fn(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (sizeof(scalar_t) * 4 <= 16) fn(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr (sizeof(scalar_t) * 8 <= 16) fn(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "ms_deform_attn (CUDA): unsupported pack width ", vec);
  }
}

}  // namespace

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   int64_t channels_per_thread) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.head_dim}, value.options());
  if (output.numel() == 0) return output;
  if (s.levels == 0 || s.points == 0 || s.tokens == 0) return output.zero_();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward", [&] {
    using acc_t = typename Accumulate<scalar_t>::type;
    const int vec = choose_vec(channels_per_thread, preferred_vec<scalar_t>(), s.head_dim, sizeof(scalar_t),
                               {value.data_ptr(), output.data_ptr()});
    const Problem pb = make_problem(s, vec);
    with_vec<scalar_t>(vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      forward_kernel<scalar_t, acc_t, VEC><<<num_blocks(pb.num_tasks, pb.log2_group), kThreadsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
          sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(), output.data_ptr<scalar_t>(), pb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights, const at::Tensor& grad_output,
                                 int64_t channels_per_thread) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.device() == value.device() && grad_output.scalar_type() == value.scalar_type() &&
                  grad_output.is_contiguous(),
              "ms_deform_attn (CUDA): grad_output must be a contiguous ", value.scalar_type(), " tensor on ",
              value.device());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.queries &&
                  grad_output.size(2) == s.heads * s.head_dim,
              "ms_deform_attn (CUDA): grad_output must be [N,Lq,M*D], got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value.device());
  const auto coord_options = sampling_locations.options();
  // fp32/fp64 values accumulate straight into their gradient; fp16/bf16 go through an fp32 buffer.
  const bool accumulate_in_place = value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble;
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(coord_options.dtype()));
  // Every location/weight gradient is written by the kernel (zero for points outside the map).
  at::Tensor grad_locations = at::empty(sampling_locations.sizes(), coord_options);
  at::Tensor grad_weights = at::empty(attention_weights.sizes(), coord_options);
  if (grad_output.numel() == 0 || s.levels == 0 || s.points == 0 || s.tokens == 0) {
    grad_locations.zero_();
    grad_weights.zero_();
  } else {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward", [&] {
      using acc_t = typename Accumulate<scalar_t>::type;
      // Packs start at multiples of VEC elements, so the fp32 buffer's wide atomics are aligned as well.
      const int vec = choose_vec(channels_per_thread, preferred_vec<scalar_t>(), s.head_dim, sizeof(scalar_t),
                                 {value.data_ptr(), grad_output.data_ptr()});
      const Problem pb = make_problem(s, vec);
      with_vec<scalar_t>(vec, [&](auto vec_constant) {
        constexpr int VEC = decltype(vec_constant)::value;
        backward_kernel<scalar_t, acc_t, VEC>
            <<<num_blocks(pb.num_tasks * pb.num_levels, pb.log2_group), kThreadsPerBlock, 0, stream>>>(
            value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
            sampling_locations.data_ptr<acc_t>(), attention_weights.data_ptr<acc_t>(),
            grad_output.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
            grad_weights.data_ptr<acc_t>(), pb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  at::Tensor grad_value = accumulate_in_place ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace chatterbox_msda
