// memoplan's plan-replaying CUDA allocator (see memoplan/runtime/allocator.py).
//
// Installed process-wide with torch.cuda.memory.change_current_allocator, it sees every tensor
// request one to one. Outside a planned phase, and for every request a phase does not plan,
// it serves from CUDA's stream-ordered pool (cudaMallocAsync / cudaFreeAsync on the request's
// stream). While a phase is active (one layer's forward or backward, on the compute stream),
// it replays the plan: the k-th request of the phase, if its size is the planned size, gets the
// planned address in the arena (a buffer memoplan allocated and registered with
// mp_set_arena). A request that does not match the next slot is looked for a few placed
// slots ahead (a planned request that never came shifts the stream); one that matches none of
// them (e.g. a kernel's workspace) is served from the pool. A phase may also name a block of
// the arena (mp_region: the workspace for recomputing a layer's dropped tokens, whose requests
// no trace lists): requests the script does not place go first-fit into that block.
//
// Safety does not rest on the plan: an address range is handed out only if it overlaps no
// live arena allocation and no range the runtime reserved (its own views into the arena).
// Every request the plan did not place is counted, so divergence is reported, never silent.
//
// Compiled with -DMEMOPLAN_HOST_BACKEND, the pool is malloc/free and no CUDA header is needed:
// the tests drive the same replay logic on a CPU through ctypes.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>
#include <sys/types.h>

#ifdef MEMOPLAN_HOST_BACKEND
typedef void* cudaStream_t;
static void* pool_alloc(size_t n, int, cudaStream_t) { return std::malloc(n); }
static void pool_free(void* p, cudaStream_t) { std::free(p); }
static int64_t pool_reserved_high(int) { return -1; }
#else
#include <cuda_runtime_api.h>
static void* pool_alloc(size_t n, int device, cudaStream_t s) {
  static bool kept[64] = {false};
  if (device >= 0 && device < 64 && !kept[device]) {
    // keep freed memory in the pool (the default threshold 0 hands it back to the driver at
    // every synchronisation, and the next step pays for cudaMalloc again)
    kept[device] = true;
    cudaMemPool_t pool;
    if (cudaDeviceGetDefaultMemPool(&pool, device) == cudaSuccess) {
      uint64_t keep = UINT64_MAX;
      cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      // and never make a stream wait for another to reuse memory freed there (a compute-stream
      // request would otherwise wait for the copy streams, losing the overlap)
      int no = 0;
      cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &no);
    }
  }
  void* p = nullptr;
  if (cudaMallocAsync(&p, n, s) == cudaSuccess) return p;
  cudaGetLastError();      // clear it; memory freed on other streams may not be back yet:
  cudaDeviceSynchronize();  // wait for it, then try once more
  if (cudaMallocAsync(&p, n, s) == cudaSuccess) return p;
  cudaGetLastError();
  // PyTorch does not check a pluggable allocator's result: a null pointer would surface later
  // as an illegal memory access, far from its cause. Stop here with the reason instead.
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  std::fprintf(stderr,
               "memoplan planned allocator: CUDA out of memory allocating %zu bytes on device "
               "%d (%zu of %zu bytes free). The plan or the model does not fit: solve with a "
               "smaller --gpu-mem-gb, or run without install_allocator() to get PyTorch's "
               "OutOfMemoryError.\n", n, device, free_b, total_b);
  std::abort();
}
static void pool_free(void* p, cudaStream_t s) { cudaFreeAsync(p, s); }
static int64_t pool_reserved_high(int device) {
  cudaMemPool_t pool;
  uint64_t v = 0;
  if (cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess) return -1;
  if (cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &v) != cudaSuccess) return -1;
  return (int64_t)v;
}
#endif

namespace {

const int kLookahead = 8;  // planned slots a request may skip to find its match

struct Slot {
  int64_t size;
  int64_t offset;  // in the arena; -1: the plan does not place this request
};

struct Range {
  int64_t start, end;  // [start, end) in the arena
};

struct State {
  std::mutex mu;
  char* arena = nullptr;
  int64_t arena_size = 0;
  bool active = false;
  cudaStream_t stream = nullptr;
  std::vector<Slot> script;
  size_t cursor = 0;
  int64_t align = 1;  // a request matches a slot if its size rounded up to this is the slot's
  int64_t region_start = 0, region_end = 0;  // the phase's first-fit block, if any
  std::map<char*, Range> live;          // arena allocations by pointer
  std::map<int64_t, int64_t> reserved;  // runtime's ranges: start -> end
  std::map<void*, int64_t> pooled;      // pool allocations -> bytes
  // counters
  int64_t planned = 0;     // requests served where the plan says (its address, or the pool)
  int64_t shifted = 0;     // served at a planned address after skipping slots (extra requests)
  int64_t unplanned = 0;   // phase requests the plan has no free slot for (pool)
  int64_t outside = 0;     // requests outside a phase or on another stream (pool)
  int64_t in_block = 0;    // phase requests placed first-fit in the phase's block
  int64_t pool_bytes = 0, pool_peak = 0, arena_live = 0, arena_peak = 0;
};

State& S() {
  static State s;
  return s;
}

bool overlaps(State& s, int64_t start, int64_t end) {
  for (auto& kv : s.live)
    if (start < kv.second.end && kv.second.start < end) return true;
  for (auto& kv : s.reserved)
    if (start < kv.second && kv.first < end) return true;
  return false;
}

void* from_pool(State& s, size_t size, int device, cudaStream_t stream) {
  void* p = pool_alloc(size, device, stream);
  if (p) {
    s.pooled[p] = (int64_t)size;
    s.pool_bytes += (int64_t)size;
    if (s.pool_bytes > s.pool_peak) s.pool_peak = s.pool_bytes;
  }
  return p;
}

void* place(State& s, const Slot& slot) {
  char* p = s.arena + slot.offset;
  s.live[p] = Range{slot.offset, slot.offset + slot.size};
  s.arena_live += slot.size;
  if (s.arena_live > s.arena_peak) s.arena_peak = s.arena_live;
  return p;
}

bool fits(State& s, const Slot& slot, int64_t size) {
  return slot.offset + size <= s.arena_size && !overlaps(s, slot.offset, slot.offset + size);
}

// The lowest free [at, at + size) in the phase's block, or -1.
int64_t first_fit(State& s, int64_t size) {
  int64_t at = s.region_start;
  while (at + size <= s.region_end) {
    int64_t past = -1;  // the end of the furthest range that overlaps [at, at + size)
    for (auto& kv : s.live)
      if (at < kv.second.end && kv.second.start < at + size && kv.second.end > past)
        past = kv.second.end;
    for (auto& kv : s.reserved)
      if (at < kv.second && kv.first < at + size && kv.second > past) past = kv.second;
    if (past < 0) return at;
    at = (past + s.align - 1) / s.align * s.align;
  }
  return -1;
}

}  // namespace

extern "C" {

void* mp_malloc(ssize_t size, int device, cudaStream_t stream) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (size <= 0) return nullptr;
  if (!s.active || stream != s.stream || !s.arena) {
    s.outside++;
    return from_pool(s, (size_t)size, device, stream);
  }
  int64_t rounded = (size + s.align - 1) / s.align * s.align;
  size_t first = s.cursor;
  size_t end = s.script.size() < first + kLookahead ? s.script.size() : first + kLookahead;
  for (size_t k = first; k < end; ++k) {
    const Slot& slot = s.script[k];
    if (slot.size != rounded || (k > first && slot.offset < 0)) continue;  // skip only to a
                                                                  // placed slot of this size
    s.cursor = k + 1;  // this request is slot k (extra requests before it are skipped)
    if (slot.offset < 0) {  // the plan leaves it to the pool
      s.planned++;
      return from_pool(s, (size_t)size, device, stream);
    }
    if (fits(s, slot, rounded)) {
      if (k == first) s.planned++; else s.shifted++;
      return place(s, slot);
    }
    break;  // its planned range is still in use: the run has left the plan here
  }
  if (s.region_end > s.region_start) {
    int64_t at = first_fit(s, rounded);
    if (at >= 0) {
      s.in_block++;
      return place(s, Slot{rounded, at});
    }
  }
  s.unplanned++;
  return from_pool(s, (size_t)size, device, stream);
}

void mp_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
  (void)size;
  (void)device;
  if (!ptr) return;
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.live.find((char*)ptr);
  if (it != s.live.end()) {  // arena memory: reusable by later work on the compute stream
    s.arena_live -= it->second.end - it->second.start;
    s.live.erase(it);
    return;
  }
  auto pit = s.pooled.find(ptr);
  if (pit != s.pooled.end()) {
    s.pool_bytes -= pit->second;
    s.pooled.erase(pit);
  }
  pool_free(ptr, stream);
}

// The arena: a buffer memoplan allocated (from the pool) for the plan. Refused (0) while
// another arena still has live planned tensors or reserved ranges.
int mp_set_arena(void* base, int64_t size) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.arena && (char*)base != s.arena && (!s.live.empty() || !s.reserved.empty())) return 0;
  s.arena = (char*)base;
  s.arena_size = size;
  return 1;
}

// Start a phase on `stream`: n requests with planned sizes (multiples of `align`) and offsets
// (-1: not placed).
void mp_begin(cudaStream_t stream, int64_t align, int64_t n, const int64_t* sizes,
              const int64_t* offsets) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.align = align > 0 ? align : 1;
  s.script.assign((size_t)n, Slot{0, -1});
  for (int64_t i = 0; i < n; ++i) s.script[i] = Slot{sizes[i], offsets[i]};
  s.cursor = 0;
  s.stream = stream;
  s.active = true;
  s.region_start = s.region_end = 0;
}

// The active phase also places, first-fit, what its script does not in [start, start + size).
void mp_region(int64_t start, int64_t size) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (start < 0 || size <= 0 || start + size > s.arena_size) return;
  s.region_start = start;
  s.region_end = start + size;
}

// End the phase; returns how many planned requests it did not see.
int64_t mp_end() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t missed = 0;
  for (size_t k = s.cursor; k < s.script.size(); ++k) missed += s.script[k].offset >= 0;
  s.active = false;
  s.script.clear();
  s.region_start = s.region_end = 0;
  return missed;
}

// The runtime's own views into the arena: 1 if [offset, offset + size) was free and is now
// reserved, 0 if it overlaps something live (the runtime then allocates elsewhere).
int mp_reserve(int64_t offset, int64_t size) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (offset < 0 || offset + size > s.arena_size || overlaps(s, offset, offset + size)) return 0;
  s.reserved[offset] = offset + size;
  return 1;
}

void mp_unreserve(int64_t offset) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.reserved.erase(offset);
}

// Counters, in this order: planned, shifted, unplanned, outside, pool bytes, pool peak,
// arena live, arena peak, live arena allocations, placed in a phase's block.
void mp_stats(int64_t* out) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t v[] = {s.planned, s.shifted, s.unplanned, s.outside, s.pool_bytes, s.pool_peak,
                 s.arena_live, s.arena_peak, (int64_t)s.live.size(), s.in_block};
  for (int i = 0; i < 10; ++i) out[i] = v[i];
}

// The CUDA pool's reserved-memory high-water mark on `device` (-1 where unknown).
int64_t mp_pool_reserved_high(int device) { return pool_reserved_high(device); }

void mp_reset_peaks() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.pool_peak = s.pool_bytes;
  s.arena_peak = s.arena_live;
}

// Every live arena range, for checks: writes up to `cap` (start, end) pairs, returns the count.
int64_t mp_live_ranges(int64_t* out, int64_t cap) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t i = 0;
  for (auto& kv : s.live) {
    if (i < cap) { out[2 * i] = kv.second.start; out[2 * i + 1] = kv.second.end; }
    ++i;
  }
  return i;
}

}  // extern "C"
