// Sweeps of one thread over its share of a contiguous row segment, shared by the row kernels (xent_rows.cu) and the
// cluster kernel (xent_rows_cluster.cu): the segment's statistics, and its gradient.
#pragma once

#include "cuda/xent_position.cuh"
#include "cuda/xent_vectors.cuh"

namespace fused_xent {
namespace cuda {

// dloss/dx of a valid position for classes [begin, end): write_row_grad's sweep, with 16-byte stores when
// kVectorStores (g has x's address phase), else one element at a time; kHint for its 16-byte loads and stores.
template <typename Group, bool kProb, bool kVectorStores, CacheHint kHint, typename scalar_t>
__device__ __forceinline__ void sweep_row_grad(const XentParams<scalar_t>& p, const scalar_t* x, const scalar_t* t,
                                               scalar_t* g, int64_t begin, int64_t end,
                                               const GradRow<acc_type<scalar_t>>& row) {
  using acc_t = acc_type<scalar_t>;
  const acc_t eps = p.label_smoothing;
  visit_classes<Group>(
      x, begin, end, p.vectorize,
      [&](auto width, int64_t c) {
        return load_class_data<kProb, decltype(width)::value, scalar_t, kHint>(x, t, c);
      },
      [&](auto width, int64_t c, const auto& in) {
        constexpr int W = decltype(width)::value;
        Pack<W, scalar_t> out;
        if constexpr (kProb) {
          // Class by class: converting whole packs of logits and targets first took the sm_90 block sweep of 16-bit
          // rows from 64 registers to 74, one block of 512 threads per SM instead of two.
#pragma unroll
          for (int i = 0; i < W; ++i) {
            out.v[i] = static_cast<scalar_t>(prob_grad_at<acc_t>(row, p.weight, c + i, static_cast<acc_t>(in.x.v[i]),
                                                                 static_cast<acc_t>(in.t.v[i]), eps, p.C));
          }
        } else {
          acc_t xs[W], d[W];
          to_acc(in.x, xs);
          index_grad_pack(row, p.weight, c, xs, d);
#pragma unroll
          for (int i = 0; i < W; ++i) out.v[i] = static_cast<scalar_t>(d[i]);
        }
        if constexpr (kVectorStores || W == 1) {
          store_pack<W, scalar_t, kHint>(g + c, out);
        } else {
#pragma unroll
          for (int i = 0; i < W; ++i) store_pack<1>(g + c + i, Pack<1, scalar_t>{{out.v[i]}});
        }
      });
}

// Writes dloss/dx for classes [begin, end) of one position, reading the logits from x: the row itself, or the
// cluster kernel's on-chip copy of it (same address phase, so the same thread visits the same classes). x may alias
// g (in-place forward): each element is read and then written by the same thread, and the caller has already read
// x[target]. A g out of x's phase (!p.grad_in_phase) is written element by element, unless the caller knows it is
// not (kGradInPhase); the fill of a position that is not valid visits g alone, aligned to g. kHint: see CacheHint.
template <typename Group, bool kProb, typename scalar_t, bool kGradInPhase = false,
          CacheHint kHint = CacheHint::kNormal>
__device__ __forceinline__ void write_row_grad(const XentParams<scalar_t>& p, const scalar_t* x, const scalar_t* t,
                                               scalar_t* g, int64_t begin, int64_t end,
                                               const GradRow<acc_type<scalar_t>>& row) {
  using acc_t = acc_type<scalar_t>;
  if (row.kind != kTargetValid) {
    const auto fill = static_cast<scalar_t>(fill_value<acc_t>(row.kind));
    visit_classes<Group>(
        g, begin, end, p.vectorize, [](auto, int64_t) { return 0; },
        [&](auto width, int64_t c, int) {
          constexpr int W = decltype(width)::value;
          Pack<W, scalar_t> out;
#pragma unroll
          for (int i = 0; i < W; ++i) out.v[i] = fill;
          store_pack<W, scalar_t, kHint>(g + c, out);
        });
  } else if (kGradInPhase || p.grad_in_phase) {
    sweep_row_grad<Group, kProb, true, kHint>(p, x, t, g, begin, end, row);
  } else {
    sweep_row_grad<Group, kProb, false, kHint>(p, x, t, g, begin, end, row);
  }
}

// Statistics of classes [begin, end) of one position, this thread's share (not yet reduced over the group). With
// `staged` set, the logits it loads are also copied to staged[c] (an on-chip buffer with x's address phase).
template <typename Group, bool kProb, typename scalar_t>
__device__ __forceinline__ RowStats<acc_type<scalar_t>> thread_row_stats(const XentParams<scalar_t>& p,
                                                                         const scalar_t* x, const scalar_t* t,
                                                                         int64_t begin, int64_t end,
                                                                         scalar_t* staged = nullptr) {
  using acc_t = acc_type<scalar_t>;
  const acc_t eps = p.label_smoothing;
  const bool smoothing = eps != acc_t(0);
  auto st = RowStats<acc_t>::empty();
  visit_classes<Group>(
      x, begin, end, p.vectorize,
      [&](auto width, int64_t c) { return load_class_data<kProb, decltype(width)::value>(x, t, c); },
      [&](auto width, int64_t c, const auto& in) {
        constexpr int W = decltype(width)::value;
        if (staged) stash_pack<W>(staged + c, in.x);
        acc_t xs[W];
        to_acc(in.x, xs);
        const acc_t m = st.add_logits(xs);
        if constexpr (kProb) {
#pragma unroll
          for (int i = 0; i < W; ++i) {
            st.add_term(class_weight(p.weight, c + i) *
                            smoothed_probability<acc_t>(static_cast<acc_t>(in.t.v[i]), eps, p.C),
                        xs[i], m);
          }
        } else if (smoothing) {
#pragma unroll
          for (int i = 0; i < W; ++i) st.add_term(class_weight(p.weight, c + i), xs[i], m);
        }
      });
  return st;
}

}  // namespace cuda
}  // namespace fused_xent
