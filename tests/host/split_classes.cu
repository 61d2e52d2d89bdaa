// Host check of how the CUDA kernels cut a position's classes into splits (split_classes in csrc/cuda/xent_launch.h
// plans them, split_item in csrc/cuda/xent_position.cuh hands them to threads), built by tests/test_device_logic.py
// with nvcc and run on the CPU. For many class counts, wishes, minimum lengths and granularities it checks that
//   - the plan has 1 .. max(1, wanted) splits, of a multiple of the granularity, none empty, covering all classes,
//     and of at least min_len classes unless there is only one;
//   - replaying every work item of a few position counts covers each (position, class) exactly once, and items
//     next to each other take neighbouring positions of the same range (what keeps the spatial loads coalesced).
// Prints "ok <cases>" and exits 0, or prints the first failure and exits 1.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/xent_launch.h"
#include "cuda/xent_position.cuh"

namespace {

[[noreturn]] void fail(const char* what, int64_t classes, int64_t wanted, int64_t min_len, int64_t granularity,
                       int64_t detail) {
  std::printf("FAIL %s: C %lld, wanted %lld, min_len %lld, granularity %lld (%lld)\n", what,
              static_cast<long long>(classes), static_cast<long long>(wanted), static_cast<long long>(min_len),
              static_cast<long long>(granularity), static_cast<long long>(detail));
  std::exit(1);
}

void check_items(int64_t classes, const fused_xent::cuda::ClassSplits& plan, int64_t positions, int64_t wanted,
                 int64_t min_len, int64_t granularity) {
  std::vector<int> seen(static_cast<size_t>(positions * classes), 0);
  for (int64_t item = 0; item < positions * plan.splits; ++item) {
    const auto work = fused_xent::cuda::split_item(item, positions, plan.split_len, classes);
    if (work.position < 0 || work.position >= positions) fail("bad position", classes, wanted, min_len, granularity, item);
    if (work.split < 0 || work.split >= plan.splits || work.begin != work.split * plan.split_len) {
      fail("bad range number", classes, wanted, min_len, granularity, item);
    }
    if (work.begin < 0 || work.begin >= work.end || work.end > classes) {
      fail("bad class range", classes, wanted, min_len, granularity, item);
    }
    if (item % positions != 0) {
      const auto previous = fused_xent::cuda::split_item(item - 1, positions, plan.split_len, classes);
      if (previous.position + 1 != work.position || previous.begin != work.begin) {
        fail("neighbouring items not neighbouring positions of one range", classes, wanted, min_len, granularity,
             item);
      }
    }
    for (int64_t c = work.begin; c < work.end; ++c) ++seen[static_cast<size_t>(work.position * classes + c)];
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (seen[i] != 1) fail("(position, class) not covered exactly once", classes, wanted, min_len, granularity, i);
  }
}

}  // namespace

int main() {
  int64_t cases = 0;
  const int64_t class_counts[] = {1, 2, 7, 8, 9, 127, 128, 129, 150, 255, 256, 257, 1000, 4095, 4096, 4097,
                                  32000, 50257, 128256, 256000};
  const int64_t wishes[] = {1, 2, 3, 5, 64, 1000, 1 << 20};
  const int64_t limits[][2] = {{128, 8}, {4096, 64}, {1, 1}};
  for (int64_t classes : class_counts) {
    for (int64_t wanted : wishes) {
      for (const auto& limit : limits) {
        const int64_t min_len = limit[0], granularity = limit[1];
        const auto plan = fused_xent::cuda::split_classes(classes, wanted, min_len, granularity);
        if (plan.splits < 1 || plan.splits > (wanted > 1 ? wanted : 1)) {
          fail("split count out of range", classes, wanted, min_len, granularity, plan.splits);
        }
        if (plan.split_len % granularity != 0) fail("length off the granularity", classes, wanted, min_len,
                                                    granularity, plan.split_len);
        if ((plan.splits - 1) * plan.split_len >= classes || plan.splits * plan.split_len < classes) {
          fail("ranges do not tile the classes", classes, wanted, min_len, granularity, plan.split_len);
        }
        if (plan.splits > 1 && plan.split_len < min_len) {
          fail("range shorter than min_len", classes, wanted, min_len, granularity, plan.split_len);
        }
        if (classes * 5 <= 300000) {
          for (int64_t positions : {1, 3, 37}) check_items(classes, plan, positions, wanted, min_len, granularity);
        }
        ++cases;
      }
    }
  }
  std::printf("ok %lld\n", static_cast<long long>(cases));
  return 0;
}
