// Row kernels (class stride 1: (N, C) inputs and channels_last): a warp or a block owns a position, loads its row
// with 16-byte vectors, computes max and sum of exp in one read (online softmax), and, for the fused forward,
// writes the gradient in a second sweep that hits the cache the first one filled. On sm_90+, rows whose second
// sweep would miss L2 go to the cluster kernel of xent_rows_cluster.cu when one block's shared memory holds them (by
// default up to 96 KiB, kDefaultMaxClusterBlocks there); longer rows stay here. rows_grad_kernel writes the gradient
// from a saved lse: the backward, and the gradient pass of a forward whose rows are split. The per-thread sweeps are
// in xent_row_sweeps.cuh.
#include "cuda/xent_launch.h"
#include "cuda/xent_row_sweeps.cuh"

namespace fused_xent {
namespace cuda {
namespace {

// kSecondSweep: the cache hint of the gradient sweep (LaunchShape::streaming_second_sweep). The streaming variant is
// built for two blocks per SM, where ptxas puts the plain one by itself (64 registers; a minimum of 0 blocks leaves
// the choice to ptxas): left to choose, it took 93 registers in bfloat16, one block per SM, half the loads in flight
// of a plan that already keeps fewer rows in flight.
template <typename scalar_t, typename Group, bool kProb, CacheHint kSecondSweep = CacheHint::kNormal>
__global__ void __launch_bounds__(Group::kMaxThreads, kSecondSweep == CacheHint::kStreaming ? 2 : 0)
    rows_forward_kernel(const XentParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  __shared__ RowStats<acc_t> smem[32];
  const int64_t positions = p.N * p.S;
  const acc_t eps = p.label_smoothing;
  const acc_t weight_sum = weight_sum_or_count(p);
  acc_t loss_acc = 0, weight_acc = 0;  // this block's share of the reduction (group rank 0 only)
  // A position's class index is read one position ahead (the cluster kernel reads two ahead): the branch on it (is
  // the row read at all?) then never waits for a load at the start of a row, when none of the row's loads are in
  // flight yet.
  const auto class_index = [&](int64_t r) { return !kProb && r < positions ? p.target_index[r] : int64_t(0); };
  int64_t y = class_index(Group::index());

  for (int64_t r = Group::index(); r < positions; r += Group::count()) {
    const int64_t next_y = class_index(r + Group::count());
    const Position pos = locate(p, r);
    const scalar_t* x = p.logits + pos.offset;
    const scalar_t* t = kProb ? p.target_prob + pos.offset : nullptr;
    const auto target = kProb ? forward_target<true>(p, r, x, 1) : read_index_target(p, y, x, 1);

    // An ignored position is not read (the whole group agrees): its lse is that of no classes.
    const auto st = kProb || target.kind != kTargetIgnored
                        ? Group::allreduce(thread_row_stats<Group, kProb>(p, x, t, 0, p.C), smem)
                        : RowStats<acc_t>::empty();
    const acc_t log_sum = st.log_sum();
    if (Group::rank() == 0) {
      const auto loss = position_loss<kProb>(target, st, log_sum, weight_sum, eps, p.C);
      record_position(p, r, st, log_sum, loss, loss_acc, weight_acc);
    }

    if (p.grad) {
      Group::sync();  // every read of this row happens before any write of its gradient (in-place aliasing)
      const auto row =
          forward_grad_row<kProb>(target, st, log_sum, weight_sum, eps, p.C, upstream_scale(p, pos.n, pos.s));
      write_row_grad<Group, kProb, scalar_t, false, kSecondSweep>(p, x, t, p.grad + pos.offset, 0, p.C, row);
    }
    y = next_y;
  }

  store_block_partials(p, loss_acc, weight_acc);
}

// Work item = (position, split): classes [split * split_len, min(C, (split + 1) * split_len)).
template <typename scalar_t, typename Group, bool kProb>
__global__ void __launch_bounds__(Group::kMaxThreads)
    rows_grad_kernel(const XentParams<scalar_t> p, int64_t splits, int64_t split_len) {
  using acc_t = acc_type<scalar_t>;
  __shared__ RowStats<acc_t> smem[32];
  const int64_t items = p.N * p.S * splits;
  const acc_t eps = p.label_smoothing;
  const acc_t weight_sum = weight_sum_or_count(p);

  for (int64_t item = Group::index(); item < items; item += Group::count()) {
    const SplitItem work = row_split_item(item, splits, split_len, p.C);
    const int64_t r = work.position;
    const Position pos = locate(p, r);
    const scalar_t* x = p.logits + pos.offset;
    const scalar_t* t = kProb ? p.target_prob + pos.offset : nullptr;
    const SavedLse<acc_t> saved = saved_lse(p, r);
    const acc_t scale = upstream_scale(p, pos.n, pos.s);

    GradRow<acc_t> row{};
    if constexpr (kProb) {
      // T = sum_c w[c] t'[c] over the whole row (probability targets never split).
      auto st = RowStats<acc_t>::empty();
      visit_classes<Group>(
          t, 0, p.C, p.vectorize, [&](auto width, int64_t c) { return load_pack<decltype(width)::value>(t + c); },
          [&](auto width, int64_t c, const auto& tv) {
#pragma unroll
            for (int i = 0; i < decltype(width)::value; ++i) {
              st.tsum += class_weight(p.weight, c + i) *
                         smoothed_probability<acc_t>(static_cast<acc_t>(tv.v[i]), eps, p.C);
            }
          });
      row = prob_grad_row<acc_t>(saved.lse, scale, Group::allreduce(st, smem).tsum);
    } else {
      row = backward_index_grad_row(p, r, saved.lse, weight_sum, scale);
    }
    write_row_grad<Group, kProb>(p, x, t, p.grad + pos.offset, work.begin, work.end,
                                 with_lse_factor(row, saved.factor));
  }
}

}  // namespace

template <typename scalar_t>
void launch_rows_forward(const XentParams<scalar_t>& p, bool warp_per_row, const LaunchShape& shape,
                         cudaStream_t stream) {
  const bool prob = p.target_prob != nullptr;
  // The streaming variant is built for the one case its plan takes: block rows of class indices.
  const bool streaming = shape.streaming_second_sweep && !warp_per_row && !prob;
  auto kernel = warp_per_row ? (prob ? rows_forward_kernel<scalar_t, WarpGroup, true>
                                     : rows_forward_kernel<scalar_t, WarpGroup, false>)
                : streaming  ? rows_forward_kernel<scalar_t, BlockGroup, false, CacheHint::kStreaming>
                             : (prob ? rows_forward_kernel<scalar_t, BlockGroup, true>
                                     : rows_forward_kernel<scalar_t, BlockGroup, false>);
  launch_kernel(kernel, shape.grid, shape.threads, stream, p);
}

template <typename scalar_t>
void launch_rows_grad(const XentParams<scalar_t>& p, bool warp_per_row, const LaunchShape& shape,
                      cudaStream_t stream) {
  const bool prob = p.target_prob != nullptr;
  auto kernel = warp_per_row ? (prob ? rows_grad_kernel<scalar_t, WarpGroup, true>
                                     : rows_grad_kernel<scalar_t, WarpGroup, false>)
                             : (prob ? rows_grad_kernel<scalar_t, BlockGroup, true>
                                     : rows_grad_kernel<scalar_t, BlockGroup, false>);
  launch_kernel(kernel, shape.grid, shape.threads, stream, p, shape.splits, shape.split_len);
}

#define INSTANTIATE(T)                                                                                         \
  template void launch_rows_forward<T>(const XentParams<T>&, bool, const LaunchShape&, cudaStream_t);           \
  template void launch_rows_grad<T>(const XentParams<T>&, bool, const LaunchShape&, cudaStream_t);
FUSED_XENT_FOR_EACH_SCALAR(INSTANTIATE)
#undef INSTANTIATE

}  // namespace cuda
}  // namespace fused_xent
