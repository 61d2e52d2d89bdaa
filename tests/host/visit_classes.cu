// Host check of the CUDA kernels' class visit (csrc/cuda/xent_vectors.cuh), built by tests/test_device_logic.py
// with nvcc and run on the CPU: no GPU needed. For every element size, thread-group size, segment [begin, end) and
// address phase, with and without vectorization, it replays every thread of the group and checks that
//   - every class of the segment is visited exactly once and nothing outside it,
//   - a visit is one class, or a full 16-byte vector at a 16-byte-aligned address of the anchor row,
//   - each use receives what its own load returned, and a thread's loads of a batch all come before its uses,
//   - a second visit of the same segment (the cluster kernel's staged copy) gives each thread the same classes.
// Prints "ok <cases>" and exits 0, or prints the first failure and exits 1.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/xent_vectors.cuh"

namespace {

// Stands in for WarpGroup / BlockGroup: the thread being replayed.
struct ReplayedThread {
  static int current_rank, group_size;
  static int rank() { return current_rank; }
  static int size() { return group_size; }
};
int ReplayedThread::current_rank = 0;
int ReplayedThread::group_size = 32;

struct Visit {
  int64_t first;
  int width;
  bool operator==(const Visit& o) const { return first == o.first && width == o.width; }
};

[[noreturn]] void fail(const char* what, int elem, int group, int64_t begin, int64_t end, int phase, bool vec,
                       int64_t c) {
  std::printf("FAIL %s: element %d bytes, group %d, segment [%lld, %lld), phase %d, vectorize %d, class %lld\n", what,
              elem, group, static_cast<long long>(begin), static_cast<long long>(end), phase, vec ? 1 : 0,
              static_cast<long long>(c));
  std::exit(1);
}

template <typename T>
std::vector<Visit> replay(const T* anchor, int64_t begin, int64_t end, bool vectorize, int elem, int group,
                          int phase) {
  std::vector<Visit> visits;
  int64_t outstanding = 0;  // loads not yet used
  bool using_started = false;
  auto load = [&](auto width, int64_t c) {
    if (using_started && outstanding == 0) using_started = false;  // a new batch
    if (using_started) fail("load between the uses of a batch", elem, group, begin, end, phase, vectorize, c);
    ++outstanding;
    return c * 1000 + decltype(width)::value;  // what this load "read"
  };
  auto use = [&](auto width, int64_t c, int64_t loaded) {
    constexpr int W = decltype(width)::value;
    if (loaded != c * 1000 + W) fail("use got another visit's load", elem, group, begin, end, phase, vectorize, c);
    if (outstanding-- <= 0) fail("use without a load", elem, group, begin, end, phase, vectorize, c);
    using_started = true;
    visits.push_back({c, W});
  };
  fused_xent::cuda::visit_classes<ReplayedThread>(anchor, begin, end, vectorize, load, use);
  if (outstanding != 0) fail("load never used", elem, group, begin, end, phase, vectorize, -1);
  return visits;
}

template <typename T>
int64_t check_element_type() {
  constexpr int kElem = sizeof(T);
  constexpr int V = 16 / kElem;
  alignas(16) static T row[4096 + 16];
  int64_t cases = 0;
  const int groups[] = {32, 64, 256};
  const int64_t segments[][2] = {{0, 0},   {0, 1},    {0, 7},     {3, 4},      {0, 31},   {5, 37},
                                 {0, 128}, {1, 129},  {2, 1000},  {7, 1031},   {0, 4096}, {100, 4000},
                                 {9, 9},   {17, 300}, {64, 2112}, {13, 13 + 32 * 4 * V + V - 1}};
  for (int group : groups) {
    ReplayedThread::group_size = group;
    for (const auto& segment : segments) {
      const int64_t begin = segment[0], end = segment[1];
      for (int phase = 0; phase < V; ++phase) {
        const T* anchor = row + phase;  // address phase of class 0: phase elements past a 16-byte boundary
        for (bool vectorize : {true, false}) {
          std::vector<int> seen(static_cast<size_t>(end) + 1, 0);
          for (int rank = 0; rank < group; ++rank) {
            ReplayedThread::current_rank = rank;
            const auto visits = replay(anchor, begin, end, vectorize, kElem, group, phase);
            if (replay(anchor, begin, end, vectorize, kElem, group, phase) != visits) {
              fail("a second visit differs", kElem, group, begin, end, phase, vectorize, -1);
            }
            for (const Visit& v : visits) {
              if (v.width != 1) {
                if (!vectorize || v.width != V) fail("bad width", kElem, group, begin, end, phase, vectorize, v.first);
                if ((reinterpret_cast<uintptr_t>(anchor + v.first) & 15) != 0) {
                  fail("misaligned vector", kElem, group, begin, end, phase, vectorize, v.first);
                }
              }
              for (int64_t c = v.first; c < v.first + v.width; ++c) {
                if (c < begin || c >= end) fail("outside the segment", kElem, group, begin, end, phase, vectorize, c);
                ++seen[static_cast<size_t>(c)];
              }
            }
          }
          for (int64_t c = begin; c < end; ++c) {
            if (seen[static_cast<size_t>(c)] != 1) {
              fail("not visited exactly once", kElem, group, begin, end, phase, vectorize, c);
            }
          }
          ++cases;
        }
      }
    }
  }
  return cases;
}

}  // namespace

int main() {
  const int64_t cases =
      check_element_type<double>() + check_element_type<float>() + check_element_type<c10::BFloat16>();
  std::printf("ok %lld\n", static_cast<long long>(cases));
  return 0;
}
