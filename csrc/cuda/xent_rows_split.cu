// Split rows: when a few positions have very many classes (e.g. 512 x 256000), one block per position leaves most
// of the GPU idle, so several blocks share a position. Each writes the statistics of its split; a second kernel
// merges them per position in split order (fixed, hence bitwise reproducible) and finishes lse and loss. The fused
// forward then writes the gradient with the row gradient kernel, split the same way. The combine also serves split
// NCHW positions (xent_spatial.cu), whose statistics have the same layout.
#include <algorithm>

#include "cuda/xent_launch.h"
#include "cuda/xent_position.cuh"
#include "cuda/xent_vectors.cuh"

namespace fused_xent {
namespace cuda {
namespace {

// Work item = (position, split); class-index targets only.
template <typename scalar_t>
__global__ void __launch_bounds__(BlockGroup::kMaxThreads)
    rows_split_stats_kernel(const XentParams<scalar_t> p, int64_t splits, int64_t split_len,
                            RowStats<acc_type<scalar_t>>* split_stats) {
  using acc_t = acc_type<scalar_t>;
  __shared__ RowStats<acc_t> smem[32];
  const int64_t items = p.N * p.S * splits;
  const bool smoothing = p.label_smoothing != acc_t(0);

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const SplitItem work = row_split_item(item, splits, split_len, p.C);
    const int64_t r = work.position;
    const scalar_t* x = p.logits + locate(p, r).offset;

    auto st = RowStats<acc_t>::empty();
    // An ignored position is not read: the combine finds the lse of no classes.
    if (classify_target(p.target_index[r], p.ignore_index, p.C) == kTargetIgnored) {
      if (threadIdx.x == 0) split_stats[work.split * p.N * p.S + r] = st;
      continue;
    }
    visit_classes<BlockGroup>(
        x, work.begin, work.end, p.vectorize,
        [&](auto width, int64_t c) { return load_pack<decltype(width)::value>(x + c); },
        [&](auto width, int64_t c, const auto& xv) {
          constexpr int W = decltype(width)::value;
          acc_t xs[W];
          to_acc(xv, xs);
          const acc_t m = st.add_logits(xs);
          if (smoothing) {
#pragma unroll
            for (int i = 0; i < W; ++i) st.add_term(class_weight(p.weight, c + i), xs[i], m);
          }
        });
    st = BlockGroup::allreduce(st, smem);
    if (threadIdx.x == 0) split_stats[work.split * p.N * p.S + r] = st;
  }
}

// The combine merges a position's ranges in groups of this many, then the groups: rounding grows with the length of
// a chain of merges. With smoothing and a class masked at -1e9, one chain over 500 NCHW ranges lost 1.1e-5 of the
// loss, groups of 16 lose 1e-6 (tests/test_cuda_emulated.py).
constexpr int64_t kMergeGroup = 16;

// One thread per position, any layout.
template <typename scalar_t>
__global__ void __launch_bounds__(kPerPositionThreads)
    split_combine_kernel(const XentParams<scalar_t> p, int64_t splits,
                         const RowStats<acc_type<scalar_t>>* split_stats) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.N * p.S;
  const acc_t eps = p.label_smoothing;
  const acc_t weight_sum = weight_sum_or_count(p);
  acc_t loss_acc = 0, weight_acc = 0;

  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < positions;
       r += int64_t(gridDim.x) * blockDim.x) {
    // Neighbouring threads read neighbouring records: split k of every position is stored together.
    auto st = RowStats<acc_t>::empty();
    for (int64_t group = 0; group < splits; group += kMergeGroup) {
      auto part = split_stats[group * positions + r];
      for (int64_t k = group + 1; k < std::min(group + kMergeGroup, splits); ++k) {
        part.merge(split_stats[k * positions + r]);
      }
      st.merge(part);
    }
    const acc_t log_sum = st.log_sum();

    // The target logit is read here, before the gradient kernel that may overwrite the logits runs.
    const auto target = read_index_target(p, p.target_index[r], p.logits + locate(p, r).offset, p.stride_c);
    const auto loss = position_loss<false>(target, st, log_sum, weight_sum, eps, p.C);
    record_position(p, r, st, log_sum, loss, loss_acc, weight_acc);
  }

  store_block_partials(p, loss_acc, weight_acc);
}

}  // namespace

template <typename scalar_t>
void launch_rows_split_stats(const XentParams<scalar_t>& p, const LaunchShape& shape,
                             RowStats<acc_type<scalar_t>>* split_stats, cudaStream_t stream) {
  launch_kernel(rows_split_stats_kernel<scalar_t>, shape.grid, shape.threads, stream, p, shape.splits,
                shape.split_len, split_stats);
}

template <typename scalar_t>
void launch_split_combine(const XentParams<scalar_t>& p, const LaunchShape& shape, int64_t splits,
                          const RowStats<acc_type<scalar_t>>* split_stats, cudaStream_t stream) {
  launch_kernel(split_combine_kernel<scalar_t>, shape.grid, shape.threads, stream, p, splits, split_stats);
}

#define INSTANTIATE(T)                                                                                            \
  template void launch_rows_split_stats<T>(const XentParams<T>&, const LaunchShape&, RowStats<acc_type<T>>*,      \
                                           cudaStream_t);                                                          \
  template void launch_split_combine<T>(const XentParams<T>&, const LaunchShape&, int64_t,                        \
                                        const RowStats<acc_type<T>>*, cudaStream_t);
FUSED_XENT_FOR_EACH_SCALAR(INSTANTIATE)
#undef INSTANTIATE

}  // namespace cuda
}  // namespace fused_xent
