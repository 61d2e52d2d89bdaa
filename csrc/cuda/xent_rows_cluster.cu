// Fused forward (loss and gradient) of long rows on sm_90+: a thread-block cluster owns a position and each of its
// blocks one slice of the row, which it keeps in shared memory while the blocks combine their slice statistics
// through distributed shared memory. The gradient is then computed from the on-chip copy, so the logits are read
// from HBM exactly once at any vocabulary size. The block-per-row kernel's second sweep relies on L2 instead, which
// stops working once the rows in flight outgrow it (a few hundred rows of 128K-256K classes). By default a cluster is
// one block, so only rows that one block's shared memory holds come here (kDefaultMaxClusterBlocks says why).
//
// Two ways to fill the slices. rows_cluster_kernel: the threads load their share of the slice (registers, then
// shared memory) and take its statistics on the way, two blocks per SM. rows_bulk_cluster_kernel
// (FUSED_XENT_BULK_ROW_SLICES=1, opt-in until a GPU has timed it): the copy engine brings each slice into one of two
// buffers of its block (by default one per SM), the next position's slice while the threads work on this one, so
// that HBM never waits for the threads' turn between positions.
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/xent_bulk_copy.cuh"
#include "cuda/xent_launch.h"
#include "cuda/xent_row_sweeps.cuh"

namespace fused_xent {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

// Shared memory for one block's slice: small enough for two 512-thread blocks per SM, so one can load while the
// other waits at the cluster barrier; 11 such slices hold a 256K-class float32 row (the 16 of the largest cluster,
// 384K).
constexpr int64_t kSliceBytes = 96 * 1024;
// The bulk-copy kernel's slice buffers share at most this much of a block's shared memory (227 KiB on sm_90). By
// default two buffers of 100 KiB, one block per SM: a 128256-class bfloat16 row takes clusters of 3 blocks, a
// 256000-class one of 5. FUSED_XENT_BULK_SLICE_KIB makes the slices smaller: at 48, two blocks share an SM (one can
// compute while the other waits at its cluster barrier), in clusters of 6 and 11 blocks for those rows.
// FUSED_XENT_BULK_BUFFERS=3 or 4 fetches 2 or 3 positions ahead instead of 1, in slices of at most a third or a
// quarter of the budget.
constexpr int64_t kBulkBufferBudget = 200 * 1024;
constexpr int64_t kBulkSliceKib = 100;
constexpr int64_t kMinBulkSliceKib = 16;
constexpr int kMaxBulkBuffers = 4;
constexpr int64_t kMaxClusterBlocks = 16;  // the most that sm_90 allows (above 8 is "non-portable")
static_assert(kMaxClusterBlocks <= 32, "the cluster merge takes a lane per block");
constexpr int kClusterThreads = BlockGroup::kMaxThreads;
// Clusters of one block by default: the H200 measured them 9% faster than recompute's two kernels on 4096 x 32000
// bfloat16 rows, but clusters of 3 and 6 blocks (128256 and 256000 classes) 30-40% slower than recompute (see
// benchmarks/RESULTS.md), so those rows take the block-per-row kernel's two sweeps instead.
constexpr int64_t kDefaultMaxClusterBlocks = 1;

// The most blocks a cluster of rows_cluster_kernel may have: FUSED_XENT_MAX_CLUSTER_BLOCKS (0 turns it off; the bulk
// kernel, FUSED_XENT_BULK_ROW_SLICES=1, takes up to kMaxClusterBlocks regardless).
int64_t max_cluster_blocks() {
  return plan_setting("FUSED_XENT_MAX_CLUSTER_BLOCKS", kDefaultMaxClusterBlocks, kMaxClusterBlocks);
}

int bulk_buffers() {
  const int64_t buffers = plan_setting("FUSED_XENT_BULK_BUFFERS", 2, kMaxBulkBuffers);
  TORCH_CHECK_VALUE(buffers >= 2, "fused_xent: FUSED_XENT_BULK_BUFFERS=", buffers, " is below 2 (2 to ",
                    kMaxBulkBuffers, " slice buffers per block)");
  return static_cast<int>(buffers);
}

int64_t bulk_slice_limit(int buffers) {
  const int64_t kib = plan_setting("FUSED_XENT_BULK_SLICE_KIB", kBulkSliceKib, kBulkSliceKib);
  TORCH_CHECK_VALUE(kib >= kMinBulkSliceKib, "fused_xent: FUSED_XENT_BULK_SLICE_KIB=", kib, " is below ",
                    kMinBulkSliceKib, " (slices of ", kMinBulkSliceKib, " to ", kBulkSliceKib, " KiB)");
  return std::min(kib * 1024, kBulkBufferBudget / buffers);
}

// Class-index targets, gradient in the logits' address phase (and, with kBulk, every slice 16-byte aligned: see
// slices_bulk_copyable; `buffers` slice buffers per block, 2 to kMaxBulkBuffers). Each cluster takes positions
// cluster_index, cluster_index + clusters, ...; every block of a cluster visits the same positions, so they meet at
// the same barriers.
template <typename scalar_t, bool kBulk>
__device__ __forceinline__ void cluster_rows(const XentParams<scalar_t>& p, int64_t slice_len, int buffers) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FUSED_XENT_HOST_EMULATION)
  using acc_t = acc_type<scalar_t>;
  FUSED_XENT_DYNAMIC_SHARED(unsigned char, slice_bytes);
  FUSED_XENT_BLOCK_SHARED(RowStats<acc_t>, smem, [32]);
  // Slice statistics of the current position, published to the cluster. Two slots, by position parity: a block
  // rewrites a slot two positions later, after a cluster barrier that every reader of its old value has passed.
  FUSED_XENT_BLOCK_SHARED(RowStats<acc_t>, published, [2]);
  // kBulk: the barrier of each slice buffer's copies.
  FUSED_XENT_BLOCK_SHARED(uint64_t, slice_landed, [kMaxBulkBuffers]);

  const cg::cluster_group cluster = cg::this_cluster();
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t clusters = gridDim.x / blocks;
  const int64_t positions = p.N * p.S;
  const int64_t begin = std::min<int64_t>(p.C, rank * slice_len);
  const int64_t end = std::min<int64_t>(p.C, begin + slice_len);
  const acc_t eps = p.label_smoothing;
  const acc_t weight_sum = weight_sum_or_count(p);
  acc_t loss_acc = 0, weight_acc = 0;  // rank 0's thread 0 only

  // A position's class index is read two positions ahead, so that the branches on it (is the row read at all?) never
  // wait for it: ignore_index stands in for the positions past the end.
  const auto class_index = [&](int64_t r) { return r < positions ? p.target_index[r] : p.ignore_index; };
  const auto row_is_read = [&](int64_t y) { return classify_target(y, p.ignore_index, p.C) != kTargetIgnored; };
  // kBulk: the block's i-th position goes to buffer i % buffers, fetched buffers - 1 positions ahead (thread 0,
  // which reads the class index of the position it is to fetch one position before it does). An ignored position's
  // row is never fetched.
  scalar_t* const slice_buffers = reinterpret_cast<scalar_t*>(slice_bytes);
  const auto fetch = [&](int64_t r, int k) {
    start_bulk_copy(slice_buffers + k * slice_len, p.logits + locate(p, r).offset + begin,
                    static_cast<uint32_t>((end - begin) * int64_t(sizeof(scalar_t))), &slice_landed[k]);
  };
  const int64_t fetch_ahead = (buffers - 1) * clusters;
  uint32_t next_wait_parity = 0;  // bit k: the parity of buffer k's next copy (the same in every thread)
  int64_t r = blockIdx.x / blocks;
  int64_t y = class_index(r), next_y = class_index(r + clusters);
  int64_t fetched_y = 0;  // kBulk, thread 0: the class index of position r + fetch_ahead
  if constexpr (kBulk) {
    if (threadIdx.x == 0) {
      for (int k = 0; k < buffers; ++k) init_copy_barrier(&slice_landed[k]);
      for (int k = 0; k + 1 < buffers; ++k) {
        const int64_t ahead = r + k * clusters;
        if (ahead < positions && row_is_read(class_index(ahead))) fetch(ahead, k);
      }
      fetched_y = class_index(r + fetch_ahead);
    }
    BlockGroup::sync();  // the barriers are initialised before anyone waits on them
  }

  for (int parity = 0, buffer = 0; r < positions;
       r += clusters, parity ^= 1, buffer = kBulk && buffer + 1 < buffers ? buffer + 1 : 0) {
    const int64_t y_after_next = class_index(r + 2 * clusters);
    const int64_t next_fetched_y = kBulk && threadIdx.x == 0 ? class_index(r + clusters + fetch_ahead) : 0;
    const Position pos = locate(p, r);
    const scalar_t* x = p.logits + pos.offset;
    // Read by every block before the barrier below, after which any block may overwrite the row (in place).
    const auto target = read_index_target(p, y, x, 1);
    const bool read = target.kind != kTargetIgnored;

    // The on-chip copy of the slice, indexed by class, and this thread's share of its statistics. An ignored
    // position's gradient is a fill that never reads the slice.
    scalar_t* staged;
    auto mine = RowStats<acc_t>::empty();
    if constexpr (kBulk) {
      // The buffer the previous position used is next refilled: its gradient sweep, which the whole block has left,
      // was its last read.
      const int refilled = (buffer == 0 ? buffers : buffer) - 1;
      if (threadIdx.x == 0 && r + fetch_ahead < positions && row_is_read(fetched_y)) fetch(r + fetch_ahead, refilled);
      staged = slice_buffers + buffer * slice_len - begin;
      if (read) {
        wait_bulk_copy(&slice_landed[buffer], (next_wait_parity >> buffer) & 1u);
        next_wait_parity ^= 1u << buffer;
        mine = thread_row_stats<BlockGroup, false, scalar_t>(p, staged, nullptr, begin, end);
      }
    } else {
      // The slice copy starts at x's address phase so that both are visited with the same vectors.
      const int64_t phase = p.vectorize ? (reinterpret_cast<uintptr_t>(x + begin) & 15) / sizeof(scalar_t) : 0;
      staged = slice_buffers + phase - begin;
      if (read) mine = thread_row_stats<BlockGroup, false, scalar_t>(p, x, nullptr, begin, end, staged);
    }
    const auto slice = BlockGroup::allreduce(mine, smem);
    if (threadIdx.x == 0) published[parity] = slice;
    cluster.sync();
    // Lane k of each warp reads block k's slice statistics (one read of distributed shared memory per lane, all at
    // once, where a loop over the blocks in every thread would wait for each in turn), and every lane merges them
    // in rank order through shuffles: the same bits in every thread of every block.
    const int lane = static_cast<int>(threadIdx.x & 31);
    auto block_stats = RowStats<acc_t>::empty();
    if (lane < blocks) block_stats = *cluster.map_shared_rank(&published[parity], lane);
    RowStats<acc_t> st = shfl_stats(block_stats, 0, /*xor_mode=*/false);
    for (int k = 1; k < blocks; ++k) st.merge(shfl_stats(block_stats, k, /*xor_mode=*/false));

    const acc_t log_sum = st.log_sum();
    if (rank == 0 && threadIdx.x == 0) {
      const auto loss = position_loss<false>(target, st, log_sum, weight_sum, eps, p.C);
      record_position(p, r, st, log_sum, loss, loss_acc, weight_acc);
    }
    if (!kBulk || p.grad) {  // the bulk-copy kernel also serves the plain forward, without a gradient
      const auto row =
          forward_grad_row<false>(target, st, log_sum, weight_sum, eps, p.C, upstream_scale(p, pos.n, pos.s));
      write_row_grad<BlockGroup, false, scalar_t, true>(p, staged, nullptr, p.grad + pos.offset, begin, end, row);
    }
    // Nobody refills the buffer (kBulk: at the next position) or restages it at another address phase (which hands
    // its classes to other threads) while a slower thread still reads it.
    BlockGroup::sync();
    y = next_y;
    next_y = y_after_next;
    fetched_y = next_fetched_y;
  }
  cluster.sync();  // no block exits while another may still read its published statistics
  store_block_partials(p, loss_acc, weight_acc);
#endif
}

// Two blocks per SM, each staging its slice as it loads it.
template <typename scalar_t>
__global__ void __launch_bounds__(kClusterThreads, 2) rows_cluster_kernel(const XentParams<scalar_t> p,
                                                                          int64_t slice_len, int buffers) {
  cluster_rows<scalar_t, false>(p, slice_len, buffers);
}

// The copy engine filling the slices; as many blocks per SM as their buffers leave room for (one by default).
template <typename scalar_t>
__global__ void __launch_bounds__(kClusterThreads, 2) rows_bulk_cluster_kernel(const XentParams<scalar_t> p,
                                                                               int64_t slice_len, int buffers) {
  cluster_rows<scalar_t, true>(p, slice_len, buffers);
}

// A cluster launch: the configuration points at its own attribute, so it is built in place and never copied.
struct ClusterLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster_dim{};

  ClusterLaunch(int64_t blocks, int64_t grid, int64_t smem_bytes, cudaStream_t stream) {
    cluster_dim.id = cudaLaunchAttributeClusterDimension;
    cluster_dim.val.clusterDim.x = static_cast<unsigned>(blocks);
    cluster_dim.val.clusterDim.y = 1;
    cluster_dim.val.clusterDim.z = 1;
    config.gridDim = dim3(static_cast<unsigned>(grid));
    config.blockDim = dim3(kClusterThreads);
    config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    config.stream = stream;
    config.attrs = &cluster_dim;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// The two kernels' shared memory: `bulk_buffers` slice buffers (LaunchShape), or with 0 the plain kernel's one,
// whose copy starts up to 15 bytes into it. The slice length is rounded up to 64 classes, so a slice takes at most
// 64 elements more than its limit.
template <typename scalar_t>
int64_t slice_smem_bytes(int64_t slice_len, int bulk_buffers) {
  const int64_t slice = slice_len * int64_t(sizeof(scalar_t));
  return bulk_buffers > 0 ? bulk_buffers * slice : slice + 16;
}

int max_dynamic_smem(bool bulk) {
  constexpr int64_t kMaxRounding = 64 * sizeof(double);
  return static_cast<int>(bulk ? kBulkBufferBudget + kMaxBulkBuffers * kMaxRounding
                               : kSliceBytes + kMaxRounding + 16);
}

template <typename scalar_t>
auto cluster_kernel(int bulk_buffers) {
  return bulk_buffers > 0 ? rows_bulk_cluster_kernel<scalar_t> : rows_cluster_kernel<scalar_t>;
}

// How many clusters of `blocks` blocks fit on `device` at once; 0 if none, if the device refuses the kernel's
// attributes, or if the kernel's code for this device came from PTX older than sm_90, where its body compiled to
// nothing (e.g. TORCH_CUDA_ARCH_LIST="8.0+PTX" on an H100). Asked once per (device, kernel, cluster shape) and
// remembered: the occupancy query is not free, and a kernel's attributes (set here, the same values every time)
// persist on the device.
template <typename scalar_t>
int resident_clusters(int device, int bulk_buffers, int64_t blocks, int64_t slice_len) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int64_t, int64_t>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, bulk_buffers, blocks, slice_len);
  if (const auto it = known.find(key); it != known.end()) return it->second;

  // An error left pending by an earlier launch is reported as such, not taken for this query's answer (and cached).
  C10_CUDA_CHECK(cudaGetLastError());
  const auto kernel = cluster_kernel<scalar_t>(bulk_buffers);
  const ClusterLaunch launch(blocks, blocks, slice_smem_bytes<scalar_t>(slice_len, bulk_buffers), nullptr);
  int clusters = 0;
  cudaFuncAttributes compiled{};
  const int smem_limit = max_dynamic_smem(bulk_buffers > 0);
  if (cudaFuncGetAttributes(&compiled, kernel) != cudaSuccess || compiled.ptxVersion < 90 ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) != cudaSuccess) {
    (void)cudaGetLastError();  // "not supported here" is an answer, not an error to leave pending
    clusters = 0;
  }
  known.emplace(key, clusters);
  return clusters;
}

// The copy engine moves 16-byte aligned multiples of 16 bytes: every slice of every position must be one. Slices
// start at multiples of 64 classes, so it is enough that each row starts 16-byte aligned and spans a multiple of 16
// bytes; the gradient, of the same strides, then lies in phase too.
template <typename scalar_t>
bool slices_bulk_copyable(const XentParams<scalar_t>& p) {
  const auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
  constexpr int64_t size = sizeof(scalar_t);
  return p.grad_in_phase && aligned(static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.logits))) &&
         aligned(p.C * size) && (p.N == 1 || aligned(p.stride_n * size)) && (p.S == 1 || aligned(p.stride_s * size));
}

}  // namespace

template <typename scalar_t>
LaunchShape plan_rows_cluster(const XentParams<scalar_t>& p, int device, bool bulk) {
  LaunchShape shape;
  shape.grid = 0;
  // First: a bad setting is an error wherever the plan is asked.
  const int64_t max_blocks = bulk ? kMaxClusterBlocks : max_cluster_blocks();
  const int buffers = bulk ? bulk_buffers() : 0;
  const int64_t slice_limit = bulk ? bulk_slice_limit(buffers) : kSliceBytes;
  if (!(bulk ? slices_bulk_copyable(p) : p.grad_in_phase)) return shape;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 9) return shape;
  const int64_t blocks_needed = ceil_div(p.C * int64_t(sizeof(scalar_t)), slice_limit);
  if (blocks_needed > max_blocks) return shape;
  const int64_t slice_len = ceil_div(ceil_div(p.C, blocks_needed), 64) * 64;
  const int64_t blocks = ceil_div(p.C, slice_len);
  const int clusters = resident_clusters<scalar_t>(device, buffers, blocks, slice_len);
  // Fewer positions than the clusters that fit would leave SMs idle: the bulk kernel leaves those to the plans that
  // split rows across the GPU.
  if (clusters == 0 || (bulk && p.N * p.S < clusters)) return shape;
  // One wave: every cluster is resident and walks its share of the positions.
  shape.grid = std::min<int64_t>(p.N * p.S, clusters) * blocks;
  shape.threads = kClusterThreads;
  shape.splits = blocks;
  shape.split_len = slice_len;
  shape.bulk_buffers = buffers;
  return shape;
}

template <typename scalar_t>
void launch_rows_cluster(const XentParams<scalar_t>& p, const LaunchShape& shape, cudaStream_t stream) {
  const int buffers = shape.bulk_buffers;
  const ClusterLaunch launch(shape.splits, shape.grid, slice_smem_bytes<scalar_t>(shape.split_len, buffers), stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, cluster_kernel<scalar_t>(buffers), p, shape.split_len, buffers));
}

#define INSTANTIATE(T)                                                                         \
  template LaunchShape plan_rows_cluster<T>(const XentParams<T>&, int, bool);                     \
  template void launch_rows_cluster<T>(const XentParams<T>&, const LaunchShape&, cudaStream_t);
FUSED_XENT_FOR_EACH_SCALAR(INSTANTIATE)
#undef INSTANTIATE

}  // namespace cuda
}  // namespace fused_xent
