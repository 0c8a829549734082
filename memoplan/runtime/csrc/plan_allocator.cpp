// memoplan's plan-replaying CUDA allocator (see memoplan/runtime/allocator.py).
//
// Installed process-wide with torch.cuda.memory.change_current_allocator, it sees every tensor
// request one to one. Outside a planned phase, and for every request a phase does not plan,
// it serves from CUDA's stream-ordered pool (cudaMallocAsync / cudaFreeAsync on the request's
// stream). While a phase is active (one layer's forward or backward, on one device's compute
// stream), it replays the plan: the k-th request of the phase, if its size is the planned
// size, gets the planned address in the arena (a buffer memoplan allocated and registered with
// mp_set_arena). A request that does not match the next slot is looked for a few placed
// slots ahead (a planned request that never came shifts the stream); one that matches none of
// them (e.g. a kernel's workspace) is served from the pool. A phase may also name a block of
// the arena (mp_region: the workspace for recomputing a layer's dropped tokens, whose requests
// no trace lists): requests the script does not place go first-fit into that block. While the
// runtime runs code whose requests no script lists inside a phase (ring attention under context
// parallelism: its collectives' buffers and merge temporaries), a detour (mp_detour) holds the
// script where it is and sends the phase's requests first-fit into the bytes the plan budgets
// for that code; mp_detour_end resumes the script and puts the phase's own block back.
//
// Safety does not rest on the plan: an address range is handed out only if it overlaps no
// live arena allocation and no range the runtime reserved (its own views into the arena).
// Every request the plan did not place is counted, so divergence is reported, never silent.
//
// Failing safe:
// - A phase is keyed on (device, stream): the default stream is 0 on every device. The arena
//   is one device's; an arena on a second device is refused (mp_set_arena returns -1).
// - Tensor.record_stream (PyTorch's record_stream hook, mp_record_stream) is honoured: a freed
//   block that other streams used stays allocated until an event recorded on each of them at
//   the free has passed (polled, never waited for, at the next malloc/free/empty_cache).
// - A request that cannot be served returns null and leaves its reason for mp_last_error
//   (out of memory: planned and unplanned bytes in use, the arena's largest free range). The
//   entry point PyTorch calls (mp_torch_malloc) raises it as torch.OutOfMemoryError: PyTorch's
//   pluggable allocator does not check for a null pointer itself.
// - A request from a stream that is capturing a CUDA graph is refused with a message: the plan
//   knows nothing of graph-private memory.
// - mp_empty_cache (PyTorch's empty_cache hook) gives the pool's free memory back to CUDA.
// - Every CUDA call is checked; a failure is cleared (so it is not reported later for some
//   unrelated kernel) and counted (mp_stats: CUDA errors). An event has passed only when its
//   query succeeds (or the context is dead); a free that fails leaks the block.
// - Calls run with the block's device current, and a thread without a CUDA context (NCCL's
//   watchdog) is never switched to device 0 (see DeviceGuard): no stray context on GPU 0.
// - The state is never destroyed: frees from libtorch's static destructors at exit still work.
// No device synchronisation happens under the lock.
//
// Compiled with -DMEMOPLAN_HOST_BACKEND, the pool is malloc/free, no CUDA header is needed,
// and test hooks stand in for events, graph capture, an exhausted device, failing CUDA calls
// and threads' contexts: the tests drive the same logic (the error handling and the device
// guard included) on a CPU through ctypes.

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>
#include <sys/types.h>

namespace {

struct PoolFailure {
  bool oom = false;  // out of memory (else another error)
  std::string what;
};

// CUDA calls of the allocator's own that failed (each cleared, see `failed`); a global atomic,
// so that it never needs the state's lock and is never destroyed.
std::atomic<int64_t> cuda_errors{0};

}  // namespace

#ifdef MEMOPLAN_HOST_BACKEND
typedef void* cudaStream_t;
// The CUDA error codes the code below tells apart, with CUDA's values (the tests pass them).
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorCudartUnloading = 4,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchTimeout = 702,
  cudaErrorAssert = 710,
  cudaErrorHardwareStackError = 714,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
  cudaErrorInvalidAddressSpace = 717,
  cudaErrorInvalidPc = 718,
  cudaErrorLaunchFailure = 719,
};
#else
#include <cuda_runtime_api.h>
#include <c10/util/Exception.h>
#endif

// Errors after which the context is dead: every later call returns them again, and
// cudaGetLastError cannot clear them (those CUDA documents as needing a new process, and the
// runtime unloading at exit).
static bool sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorCudartUnloading:
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
      return true;
    default:
      return false;
  }
}

#ifdef MEMOPLAN_HOST_BACKEND
// Stand-ins for the CUDA runtime calls the shared code below makes, with the behaviours it has
// to handle: a failed call leaves its error for the thread's next cudaGetLastError (a sticky
// one for good); a call on a thread without a context creates one on the thread's current
// device (0 on a thread that never chose one); an event passes once its stream is idle; calls
// on a stream can be made to fail (test hooks at the end).
struct HostEvent {
  cudaStream_t stream;
};
typedef HostEvent* Event;
const unsigned cudaEventDisableTiming = 2;

namespace {
std::mutex host_mu;
std::set<cudaStream_t> host_busy;  // streams whose recorded work has not finished (test hook)
std::map<cudaStream_t, int> host_stream_error;  // calls on these streams fail so (test hook)
std::set<int> host_contexts;  // devices a context was created on
cudaStream_t host_capturing = nullptr;
bool host_capture_on = false;
int64_t host_pool_cap = -1;  // pool requests over this many bytes fail as out of memory
thread_local cudaError_t host_last = cudaSuccess;  // the error cudaGetLastError returns
thread_local bool host_has_context = false;
thread_local int host_device = 0;

cudaError_t host_fail(cudaError_t e) {
  if (!sticky(host_last)) host_last = e;
  return e;
}
cudaError_t host_stream_failure(cudaStream_t s) {  // call under host_mu
  auto it = host_stream_error.find(s);
  return it == host_stream_error.end() ? cudaSuccess : host_fail((cudaError_t)it->second);
}
}  // namespace

static cudaError_t cudaGetLastError() {
  cudaError_t e = host_last;
  if (!sticky(e)) host_last = cudaSuccess;
  return e;
}
static cudaError_t cudaSetDevice(int device) {
  host_device = device;
  host_has_context = true;
  std::lock_guard<std::mutex> lock(host_mu);
  host_contexts.insert(device);
  return cudaSuccess;
}
static cudaError_t cudaGetDevice(int* device) {  // creates no context, as in CUDA
  *device = host_device;
  return cudaSuccess;
}
static bool current_context() { return host_has_context; }
static void need_context() {  // the runtime's lazy initialisation
  if (!host_has_context) cudaSetDevice(host_device);
}
static cudaError_t cudaEventCreateWithFlags(Event* e, unsigned) {
  need_context();
  *e = new HostEvent{nullptr};
  return cudaSuccess;
}
static cudaError_t cudaEventRecord(Event e, cudaStream_t s) {
  need_context();
  std::lock_guard<std::mutex> lock(host_mu);
  if (cudaError_t r = host_stream_failure(s)) return r;
  e->stream = s;
  return cudaSuccess;
}
static cudaError_t cudaEventQuery(Event e) {
  need_context();
  std::lock_guard<std::mutex> lock(host_mu);
  if (cudaError_t r = host_stream_failure(e->stream)) return r;
  return host_busy.count(e->stream) ? host_fail(cudaErrorNotReady) : cudaSuccess;
}
static cudaError_t cudaEventDestroy(Event e) {
  need_context();
  delete e;
  return cudaSuccess;
}
static cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  need_context();
  {
    std::lock_guard<std::mutex> lock(host_mu);
    if (cudaError_t r = host_stream_failure(s)) return r;
  }
  std::free(p);
  return cudaSuccess;
}
#else
typedef cudaEvent_t Event;

// The driver's cuCtxGetCurrent (CUresult (*)(CUcontext*)), fetched through the runtime so the
// library links no libcuda; null where the driver does not give it.
typedef int (*CtxGetCurrent)(void** ctx);
static CtxGetCurrent ctx_get_current() {
  static CtxGetCurrent fn = [] {
    void* f = nullptr;
#if CUDART_VERSION >= 12050
    cudaDriverEntryPointQueryResult found;
    cudaError_t e = cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &f, 12000,
                                                     cudaEnableDefault, &found);
    if (e == cudaSuccess && found != cudaDriverEntryPointSuccess) f = nullptr;
#elif CUDART_VERSION >= 12000
    cudaDriverEntryPointQueryResult found;
    cudaError_t e = cudaGetDriverEntryPoint("cuCtxGetCurrent", &f, cudaEnableDefault, &found);
    if (e == cudaSuccess && found != cudaDriverEntryPointSuccess) f = nullptr;
#else
    cudaError_t e = cudaGetDriverEntryPoint("cuCtxGetCurrent", &f, cudaEnableDefault);
#endif
    if (e != cudaSuccess) {
      cudaGetLastError();
      cuda_errors++;
      f = nullptr;
    }
    return (CtxGetCurrent)f;
  }();
  return fn;
}
// Whether this thread has a current context (where it cannot tell: yes, the guard then
// restores the previous device as it always did).
static bool current_context() {
  CtxGetCurrent fn = ctx_get_current();
  void* ctx = nullptr;
  return !fn || (fn(&ctx) == 0 && ctx != nullptr);
}
#endif

// Whether a CUDA call failed. A failure is counted and its error cleared (a sticky one cannot
// be): left pending, it would be reported later as the error of some unrelated kernel.
static bool failed(cudaError_t e) {
  if (e == cudaSuccess) return false;
  if (!sticky(e)) cudaGetLastError();
  cuda_errors++;
  return true;
}

namespace {
// Makes `device` current for the scope (every runtime call below runs under one). A thread that
// never used CUDA (NCCL's watchdog freeing a record_stream'ed tensor) has no context, and
// cudaGetDevice says 0 there: restoring that 0, or any runtime call made there, would create a
// context on GPU 0 (hundreds of MB, on every rank). On such a thread the guard makes `device`
// current (its context exists: the memory is on it) and leaves it so; elsewhere it switches
// only when `device` is not current, and switches back.
struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    if (!current_context()) {
      failed(cudaSetDevice(device));
      return;
    }
    int cur = -1;
    if (failed(cudaGetDevice(&cur)) || cur == device) return;
    if (!failed(cudaSetDevice(device))) prev = cur;
  }
  ~DeviceGuard() {
    if (prev >= 0) failed(cudaSetDevice(prev));
  }
};
}  // namespace

// An event on `s`, for a block on `device`; false (nothing to destroy) where it failed.
static bool event_record(Event* e, cudaStream_t s, int device) {
  DeviceGuard guard(device);
  if (failed(cudaEventCreateWithFlags(e, cudaEventDisableTiming))) return false;
  if (failed(cudaEventRecord(*e, s))) {
    failed(cudaEventDestroy(*e));
    return false;
  }
  return true;
}

// Whether the work before an event has finished. Only success says so. Any other error means
// "not yet" (cleared, asked again at the next poll): cudaEventQuery fails while another thread
// captures a CUDA graph in global mode (cudaErrorStreamCaptureUnsupported, ...Implicit,
// cudaErrorCapturedEvent...), and releasing then could hand out memory a stream still uses; a
// block kept too long is only memory. A sticky error counts as passed: the context is dead,
// nothing will run on it again, and waiting would only hold the block forever.
static bool event_passed(Event e, int device) {
  DeviceGuard guard(device);
  cudaError_t r = cudaEventQuery(e);
  if (r == cudaSuccess) return true;
  if (r == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  failed(r);
  return sticky(r);
}

static void event_destroy(Event e, int device) {
  DeviceGuard guard(device);
  failed(cudaEventDestroy(e));
}

// Pool memory back on its stream. A free that fails (a destroyed stream, a dead context, CUDA
// unloading at exit) leaks the block, counted: freeing it on another stream instead could hand
// it out while work on its own stream still uses it.
static void pool_free(void* p, cudaStream_t s, int device) {
  DeviceGuard guard(device);
  failed(cudaFreeAsync(p, s));
}

#ifdef MEMOPLAN_HOST_BACKEND
static void* pool_alloc(size_t n, int, cudaStream_t, PoolFailure* f) {
  {
    std::lock_guard<std::mutex> lock(host_mu);
    if (host_pool_cap >= 0 && (int64_t)n > host_pool_cap) {
      f->oom = true;
      f->what = "the test's pool size cap";
      return nullptr;
    }
  }
  void* p = std::malloc(n);
  if (!p) {
    f->oom = true;
    f->what = "malloc failed";
  }
  return p;
}
static bool stream_capturing(cudaStream_t s) {
  std::lock_guard<std::mutex> lock(host_mu);
  return host_capture_on && s == host_capturing;
}
static void device_synchronize() {}
static void pool_trim() {}
static bool device_memory(int, size_t*, size_t*) { return false; }
static bool pool_reserved(int, int64_t*, int64_t*) { return false; }
static void pool_reset_high() {}
static int64_t pool_reserved_high(int) { return -1; }
#else
namespace {
const int kDevices = 64;
std::atomic<bool> pool_used[kDevices];  // devices whose default pool this allocator configured
}  // namespace

static void* pool_alloc(size_t n, int device, cudaStream_t s, PoolFailure* f) {
  if (device >= 0 && device < kDevices && !pool_used[device].exchange(true)) {
    // keep freed memory in the pool (the default threshold 0 hands it back to the driver at
    // every synchronisation, and the next step pays for cudaMalloc again; empty_cache trims)
    cudaMemPool_t pool;
    if (!failed(cudaDeviceGetDefaultMemPool(&pool, device))) {
      uint64_t keep = UINT64_MAX;
      failed(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
      // and never make a stream wait for another to reuse memory freed there (a compute-stream
      // request would otherwise wait for the copy streams, losing the overlap)
      int no = 0;
      failed(cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &no));
    }
    // the driver's entry point, fetched here, where a device is current (a runtime call on a
    // thread without a context creates one)
    ctx_get_current();
  }
  void* p = nullptr;
  cudaError_t e = cudaMallocAsync(&p, n, s);
  if (e == cudaSuccess) return p;
  cudaGetLastError();  // reported as the request's failure (refused), not as a CUDA error
  f->oom = e == cudaErrorMemoryAllocation;
  f->what = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  return nullptr;
}
static bool stream_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(s, &status);
  if (e != cudaSuccess) {
    cudaGetLastError();
    // the legacy default stream while another stream captures: that capture is under way
    return e == cudaErrorStreamCaptureImplicit;
  }
  return status != cudaStreamCaptureStatusNone;
}
static void device_synchronize() { failed(cudaDeviceSynchronize()); }
static void pool_trim() {  // every device's pool this allocator used: idle memory back to CUDA
  for (int d = 0; d < kDevices; ++d) {
    if (!pool_used[d]) continue;
    DeviceGuard guard(d);
    cudaMemPool_t pool;
    device_synchronize();  // frees still queued on a stream are not free yet
    if (!failed(cudaDeviceGetDefaultMemPool(&pool, d))) failed(cudaMemPoolTrimTo(pool, 0));
  }
}
static bool device_memory(int device, size_t* free_b, size_t* total_b) {
  DeviceGuard guard(device);
  return !failed(cudaMemGetInfo(free_b, total_b));
}
static bool pool_reserved(int device, int64_t* current, int64_t* high) {
  cudaMemPool_t pool;
  uint64_t c = 0, h = 0;
  if (failed(cudaDeviceGetDefaultMemPool(&pool, device)) ||
      failed(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &c)) ||
      failed(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &h)))
    return false;
  *current = (int64_t)c;
  *high = (int64_t)std::max(c, h);
  return true;
}
static void pool_reset_high() {
  for (int d = 0; d < kDevices; ++d) {
    cudaMemPool_t pool;
    uint64_t zero = 0;  // the only value the high-water mark can be reset to
    if (pool_used[d] && !failed(cudaDeviceGetDefaultMemPool(&pool, d)))
      failed(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
  }
}
static int64_t pool_reserved_high(int device) {
  int64_t current = 0, high = 0;
  return pool_reserved(device, &current, &high) ? high : -1;
}
#endif

namespace {

const int kLookahead = 8;  // planned slots a request may skip to find its match

struct Slot {
  int64_t size;
  int64_t offset;  // in the arena; -1: the plan does not place this request
};

struct Alloc {  // one live allocation
  int64_t start;  // offset in the arena; -1 for the pool
  int64_t size;
  int device;
  cudaStream_t stream;               // the stream it was allocated on
  std::vector<cudaStream_t> uses;    // other streams that use it (record_stream)
  int64_t peak_before = 0;           // pool: the total peak before it (see mp_set_arena)
  int64_t end() const { return start + size; }
};

struct Waiting {  // a freed allocation kept until the work its streams had queued has passed
  void* ptr;
  int device;
  std::vector<Event> events;
  bool stuck;  // an event could not be recorded: never reused
};

struct State {
  std::mutex mu;
  char* arena = nullptr;
  int64_t arena_size = 0;
  int arena_device = -1;  // the device of the first arena: the only one planned
  bool arena_in_pool = false;  // the arena is inside one of the pool's allocations
  bool active = false;
  int device = 0;  // the active phase's device and stream
  cudaStream_t stream = nullptr;
  std::vector<Slot> script;
  size_t cursor = 0;
  int64_t align = 1;  // a request matches a slot if its size rounded up to this is the slot's
  int64_t region_start = 0, region_end = 0;  // the phase's first-fit block, if any
  bool detour = false;  // mp_detour: the script waits, requests go first-fit into the region
  int64_t phase_region_start = 0, phase_region_end = 0;  // the phase's own, back at the end
  std::map<char*, Alloc> live;          // arena allocations by pointer
  std::map<int64_t, int64_t> reserved;  // runtime's ranges: start -> end
  std::map<void*, Alloc> pooled;        // pool allocations
  std::set<void*> arena_blocks;         // pool allocations that hold an arena
  std::vector<Waiting> waiting;
  std::string last_error;
  // counters
  int64_t planned = 0;     // requests served where the plan says (its address, or the pool)
  int64_t shifted = 0;     // served at a planned address after skipping slots (extra requests)
  int64_t unplanned = 0;   // phase requests the plan has no free slot for (pool)
  int64_t unplanned_bytes = 0;  // their bytes, summed
  int64_t outside = 0;     // requests outside a phase or on another device or stream (pool)
  int64_t in_block = 0;    // phase requests placed first-fit in the phase's block
  int64_t refused = 0;     // requests that got null (out of memory, graph capture)
  // bytes: pool allocations (arena buffers included), planned tensors in the arena, arena
  // buffers inside pool allocations, and their peaks
  int64_t pool_bytes = 0, pool_peak = 0, arena_live = 0, arena_peak = 0;
  int64_t arena_block_bytes = 0, arena_size_peak = 0, total_peak = 0;
};

// Never destroyed, on purpose (as PyTorch's allocators): a static would be destroyed at exit
// before libtorch's, whose destructors may still free tensors here.
State& S() {
  static State* s = new State;
  return *s;
}

// Bytes of live tensors: pool allocations other than arena buffers, and planned tensors.
int64_t total_live(State& s) { return s.pool_bytes - s.arena_block_bytes + s.arena_live; }

void note_peaks(State& s) {
  s.pool_peak = std::max(s.pool_peak, s.pool_bytes);
  s.arena_peak = std::max(s.arena_peak, s.arena_live);
  s.arena_size_peak = std::max(s.arena_size_peak, s.arena_size);
  s.total_peak = std::max(s.total_peak, total_live(s));
}

bool overlaps(State& s, int64_t start, int64_t end) {
  for (auto& kv : s.live)
    if (start < kv.second.end() && kv.second.start < end) return true;
  for (auto& kv : s.reserved)
    if (start < kv.second && kv.first < end) return true;
  return false;
}

// The largest [start, end) of the arena that no live allocation or reserved range touches.
int64_t largest_free(State& s) {
  std::vector<std::pair<int64_t, int64_t>> used;
  for (auto& kv : s.live) used.emplace_back(kv.second.start, kv.second.end());
  for (auto& kv : s.reserved) used.emplace_back(kv.first, kv.second);
  std::sort(used.begin(), used.end());
  int64_t at = 0, best = 0;
  for (auto& u : used) {
    best = std::max(best, u.first - at);
    at = std::max(at, u.second);
  }
  return std::max(best, s.arena_size - at);
}

Alloc* find(State& s, void* ptr) {
  auto it = s.live.find((char*)ptr);
  if (it != s.live.end()) return &it->second;
  auto pit = s.pooled.find(ptr);
  return pit != s.pooled.end() ? &pit->second : nullptr;
}

// Give an allocation back: arena ranges become free, pool memory goes back on its stream.
void release(State& s, void* ptr) {
  auto it = s.live.find((char*)ptr);
  if (it != s.live.end()) {
    s.arena_live -= it->second.size;
    s.live.erase(it);
    return;
  }
  auto pit = s.pooled.find(ptr);
  if (pit == s.pooled.end()) return;
  cudaStream_t stream = pit->second.stream;
  int device = pit->second.device;
  s.pool_bytes -= pit->second.size;
  if (s.arena_blocks.erase(ptr)) s.arena_block_bytes -= pit->second.size;
  s.pooled.erase(pit);
  pool_free(ptr, stream, device);
}

// Release the freed allocations whose streams have passed their events (never waits).
void reap(State& s) {
  size_t kept = 0;
  for (size_t i = 0; i < s.waiting.size(); ++i) {
    Waiting& w = s.waiting[i];
    bool passed = !w.stuck;
    for (Event e : w.events) passed = passed && event_passed(e, w.device);
    if (passed) {
      for (Event e : w.events) event_destroy(e, w.device);
      release(s, w.ptr);
    } else {
      s.waiting[kept++] = w;
    }
  }
  s.waiting.resize(kept);
}

void* place(State& s, const Slot& slot) {
  char* p = s.arena + slot.offset;
  s.live[p] = Alloc{slot.offset, slot.size, s.device, s.stream, {}};
  s.arena_live += slot.size;
  note_peaks(s);
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
      if (at < kv.second.end() && kv.second.start < at + size && kv.second.end() > past)
        past = kv.second.end();
    for (auto& kv : s.reserved)
      if (at < kv.second && kv.first < at + size && kv.second > past) past = kv.second;
    if (past < 0) return at;
    at = (past + s.align - 1) / s.align * s.align;
  }
  return -1;
}

// The arena address the plan gives this request, or null: the pool serves it (counted).
void* replay(State& s, int64_t size, int device, cudaStream_t stream) {
  if (!s.active || device != s.device || stream != s.stream || !s.arena) {
    s.outside++;
    return nullptr;
  }
  int64_t rounded = (size + s.align - 1) / s.align * s.align;
  size_t first = s.cursor;
  size_t end = s.script.size() < first + kLookahead ? s.script.size() : first + kLookahead;
  if (s.detour) end = first;  // a detour's requests are none of the script's: it waits
  for (size_t k = first; k < end; ++k) {
    const Slot& slot = s.script[k];
    if (slot.size != rounded || (k > first && slot.offset < 0)) continue;  // skip only to a
                                                                  // placed slot of this size
    s.cursor = k + 1;  // this request is slot k (extra requests before it are skipped)
    if (slot.offset < 0) {  // the plan leaves it to the pool
      s.planned++;
      return nullptr;
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
  s.unplanned_bytes += (int64_t)size;
  return nullptr;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

// Why a pool request failed, with what the allocator holds (called under the lock).
std::string failure_message(State& s, int64_t size, int device, const PoolFailure& f,
                            const std::string& device_line) {
  if (!f.oom)
    return format("memoplan's planned allocator could not allocate %lld bytes on device %d "
                  "(%s).", (long long)size, device, f.what.c_str());
  return format(
      "memoplan's planned allocator: out of memory allocating %lld bytes on device %d (%s). "
      "Planned memory (the arena): %lld of %lld bytes in use, largest free range %lld bytes. "
      "Unplanned memory (the pool, outside the arena): %lld bytes in use.%s The plan or the "
      "model does not fit: solve with a smaller --gpu-mem-gb, or run without "
      "install_allocator(); memoplan.runtime.memory_stats() shows where memory goes.",
      (long long)size, device, f.what.c_str(), (long long)s.arena_live,
      (long long)s.arena_size, (long long)largest_free(s),
      (long long)(s.pool_bytes - s.arena_block_bytes), device_line.c_str());
}

// A request: an arena address, a pool allocation, or null with `why` set (size <= 0: null).
void* allocate(int64_t size, int device, cudaStream_t stream, bool* oom, std::string* why) {
  State& s = S();
  *oom = false;
  if (size <= 0) return nullptr;
  if (stream_capturing(stream)) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.refused++;
    *why = format(
        "memoplan's planned allocator does not serve CUDA graph capture: a request of %lld "
        "bytes on device %d came from a stream that is capturing (torch.cuda.graph, "
        "torch.compile(mode=\"reduce-overhead\"), CUDA-graph trees). Its plan knows nothing "
        "of graph-private memory, so the capture is refused rather than corrupted: capture "
        "graphs in a process without install_allocator().", (long long)size, device);
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(s.mu);
    reap(s);
    if (void* p = replay(s, size, device, stream)) return p;
  }
  PoolFailure f;
  void* p = pool_alloc((size_t)size, device, stream, &f);
  if (!p && f.oom) {
    // memory freed on other streams, or held for recorded streams, may be back once the
    // device is idle: wait for it (outside the lock) and try once more
    device_synchronize();
    {
      std::lock_guard<std::mutex> lock(s.mu);
      reap(s);
    }
    f = PoolFailure();
    p = pool_alloc((size_t)size, device, stream, &f);
  }
  std::string device_line;
  size_t free_b = 0, total_b = 0;
  if (!p && f.oom && device_memory(device, &free_b, &total_b))
    device_line = format(" The device has %zu of %zu bytes free.", free_b, total_b);
  std::lock_guard<std::mutex> lock(s.mu);
  if (!p) {
    s.refused++;
    *oom = f.oom;
    *why = failure_message(s, size, device, f, device_line);
    return nullptr;
  }
  s.pooled[p] = Alloc{-1, size, device, stream, {}, s.total_peak};
  s.pool_bytes += size;
  note_peaks(s);
  return p;
}

void remember(const std::string& why) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.last_error = why;
}

}  // namespace

extern "C" {

// A request as the tests make it: null (with mp_last_error) where it cannot be served.
void* mp_malloc(ssize_t size, int device, cudaStream_t stream) {
  bool oom = false;
  std::string why;
  void* p = allocate(size, device, stream, &oom, &why);
  if (!p && size > 0) remember(why);
  return p;
}

#ifndef MEMOPLAN_HOST_BACKEND
// The entry point PyTorch calls. Its pluggable allocator takes a null pointer as an allocation
// (an empty storage whose first use fails far from here), so a request that cannot be served
// raises: torch.OutOfMemoryError when out of memory, RuntimeError otherwise.
void* mp_torch_malloc(ssize_t size, int device, cudaStream_t stream) {
  bool oom = false;
  std::string why;
  void* p = allocate(size, device, stream, &oom, &why);
  if (p || size <= 0) return p;
  remember(why);
  TORCH_CHECK_WITH(OutOfMemoryError, !oom, why);
  TORCH_CHECK(false, why);
  return nullptr;
}
#endif

void mp_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
  (void)size;
  if (!ptr) return;
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  reap(s);
  Alloc* a = find(s, ptr);
  if (!a) {  // not one of ours
    pool_free(ptr, stream, device);
    return;
  }
  if (a->uses.empty()) {  // arena: reusable by later work on its stream; pool: stream-ordered
    release(s, ptr);
    return;
  }
  Waiting w{ptr, a->device, {}, false};
  for (cudaStream_t other : a->uses) {
    Event e;
    if (event_record(&e, other, a->device)) w.events.push_back(e); else w.stuck = true;
  }
  a->uses.clear();
  s.waiting.push_back(w);
}

// PyTorch's record_stream hook: `ptr` is also used on `stream`.
void mp_record_stream(void* ptr, cudaStream_t stream) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  Alloc* a = find(s, ptr);
  if (!a || stream == a->stream) return;
  if (std::find(a->uses.begin(), a->uses.end(), stream) == a->uses.end())
    a->uses.push_back(stream);
}

// PyTorch's empty_cache hook: what waits for its streams and has passed is released, then the
// pool's idle memory goes back to CUDA.
void mp_empty_cache() {
  State& s = S();
  device_synchronize();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    reap(s);
  }
  pool_trim();
}

// The reason the last request that got null was refused; returns its length, writes up to
// `cap` - 1 bytes and a terminating zero.
int64_t mp_last_error(char* out, int64_t cap) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (cap > 0) {
    size_t n = std::min((size_t)(cap - 1), s.last_error.size());
    std::memcpy(out, s.last_error.data(), n);
    out[n] = 0;
  }
  return (int64_t)s.last_error.size();
}

// The arena: a buffer memoplan allocated (from the pool) for the plan on `device`. Returns 1,
// 0 while another arena still has live planned tensors or reserved ranges, -1 for a device
// other than the first arena's (the allocator plans one device per process).
int mp_set_arena(void* base, int64_t size, int device) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.arena_device >= 0 && device != s.arena_device) return -1;
  if (s.arena && (char*)base != s.arena && (!s.live.empty() || !s.reserved.empty())) return 0;
  s.arena = (char*)base;
  s.arena_size = size;
  s.arena_device = device;
  s.arena_in_pool = false;
  auto it = s.pooled.upper_bound(base);  // the pool allocation that holds it, if any
  if (it != s.pooled.begin()) {
    --it;
    Alloc& block = it->second;
    if ((char*)base + size <= (char*)it->first + block.size) {
      s.arena_in_pool = true;
      if (s.arena_blocks.insert(it->first).second) {
        // it is no tensor: take it out of the live bytes, and of the peaks seen since it came
        s.arena_block_bytes += block.size;
        s.total_peak = std::max(block.peak_before, s.total_peak - block.size);
      }
    }
  }
  note_peaks(s);
  return 1;
}

// 1 when the arena holds no live planned tensor and no range the runtime reserved: what a
// switch to another arena needs (mp_set_arena), so the runtime may let the old buffer go
// before it allocates the next one.
int mp_arena_idle() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  return s.live.empty() && s.reserved.empty() ? 1 : 0;
}

// Start a phase on (`device`, `stream`): n requests with planned sizes (multiples of `align`)
// and offsets (-1: not placed). Returns 0 (no phase) where the arena is another device's.
int mp_begin(int device, cudaStream_t stream, int64_t align, int64_t n, const int64_t* sizes,
             const int64_t* offsets) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.arena_device >= 0 && device != s.arena_device) return 0;
  s.align = align > 0 ? align : 1;
  s.script.assign((size_t)n, Slot{0, -1});
  for (int64_t i = 0; i < n; ++i) s.script[i] = Slot{sizes[i], offsets[i]};
  s.cursor = 0;
  s.device = device;
  s.stream = stream;
  s.active = true;
  s.region_start = s.region_end = 0;
  s.detour = false;
  return 1;
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
  s.detour = false;
  return missed;
}

// A detour inside the active phase (ring attention, whose requests no trace lists): until
// mp_detour_end the script waits (its cursor stays, no slot is taken or skipped) and requests
// go first-fit into [start, start + size), the bytes the plan budgets for the detour (size 0:
// into the phase's own block, if it has one), else to the pool (counted as unplanned). Nothing
// happens outside a phase; a second mp_detour before the end only moves the block.
void mp_detour(int64_t start, int64_t size) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.active) return;
  if (!s.detour) {
    s.detour = true;
    s.phase_region_start = s.region_start;
    s.phase_region_end = s.region_end;
  }
  if (start >= 0 && size > 0 && start + size <= s.arena_size) {
    s.region_start = start;
    s.region_end = start + size;
  } else {
    s.region_start = s.phase_region_start;
    s.region_end = s.phase_region_end;
  }
}

// The detour is over: the script goes on where it waited, the phase's own block is back.
void mp_detour_end() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.detour) return;
  s.detour = false;
  s.region_start = s.phase_region_start;
  s.region_end = s.phase_region_end;
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
// arena live, arena peak, live arena allocations, placed in a phase's block, refused,
// freed allocations waiting for their streams, failed CUDA calls (cleared), bytes of the
// unplanned requests.
void mp_stats(int64_t* out) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t v[] = {s.planned, s.shifted, s.unplanned, s.outside, s.pool_bytes, s.pool_peak,
                 s.arena_live, s.arena_peak, (int64_t)s.live.size(), s.in_block, s.refused,
                 (int64_t)s.waiting.size(), cuda_errors.load(), s.unplanned_bytes};
  for (int i = 0; i < 14; ++i) out[i] = v[i];
}

// Memory, for the arena, the pool and in total, each as allocated, allocated peak, reserved,
// reserved peak. Arena: planned tensors live / its size. Pool: its allocations (arena buffers
// included) / what CUDA's pool on `device` holds (the host backend: its allocations). Total:
// live tensors (planned ones and the pool's other than arena buffers) / the pool's reserve
// and an arena that is not in the pool.
void mp_memory_stats(int device, int64_t* out) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t reserved = 0, reserved_high = 0;
  if (!pool_reserved(device, &reserved, &reserved_high)) {
    reserved = s.pool_bytes;  // malloc keeps nothing: what is reserved is what is allocated
    reserved_high = s.pool_peak;
  }
  int64_t outside = s.arena_in_pool ? 0 : s.arena_size;
  int64_t v[] = {s.arena_live, s.arena_peak, s.arena_size, s.arena_size_peak,
                 s.pool_bytes, s.pool_peak, reserved, reserved_high,
                 total_live(s), s.total_peak, reserved + outside, reserved_high + outside};
  for (int i = 0; i < 12; ++i) out[i] = v[i];
}

// The CUDA pool's reserved-memory high-water mark on `device` (-1 where unknown).
int64_t mp_pool_reserved_high(int device) { return pool_reserved_high(device); }

void mp_reset_peaks() {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  s.pool_peak = s.pool_bytes;
  s.arena_peak = s.arena_live;
  s.arena_size_peak = s.arena_size;
  s.total_peak = total_live(s);
  for (auto& kv : s.pooled) kv.second.peak_before = 0;  // nothing before them counts now
  pool_reset_high();
}

// Every live arena range, for checks: writes up to `cap` (start, end) pairs, returns the count.
int64_t mp_live_ranges(int64_t* out, int64_t cap) {
  State& s = S();
  std::lock_guard<std::mutex> lock(s.mu);
  int64_t i = 0;
  for (auto& kv : s.live) {
    if (i < cap) { out[2 * i] = kv.second.start; out[2 * i + 1] = kv.second.end(); }
    ++i;
  }
  return i;
}

#ifdef MEMOPLAN_HOST_BACKEND
// Test hooks of the host backend. Work recorded on a busy stream has not finished: an event
// recorded there passes once the stream is marked idle.
void mp_test_set_busy(cudaStream_t stream, int busy) {
  std::lock_guard<std::mutex> lock(host_mu);
  if (busy) host_busy.insert(stream); else host_busy.erase(stream);
}

// `stream` is capturing a CUDA graph (on: 1) or not.
void mp_test_set_capturing(cudaStream_t stream, int on) {
  std::lock_guard<std::mutex> lock(host_mu);
  host_capturing = stream;
  host_capture_on = on != 0;
}

// Pool requests over `bytes` fail as out of memory (-1: no cap).
void mp_test_set_pool_cap(int64_t bytes) {
  std::lock_guard<std::mutex> lock(host_mu);
  host_pool_cap = bytes;
}

// CUDA calls on `stream` (event records and queries, frees) fail with `error` (0: succeed).
void mp_test_set_stream_error(cudaStream_t stream, int error) {
  std::lock_guard<std::mutex> lock(host_mu);
  if (error) host_stream_error[stream] = error; else host_stream_error.erase(stream);
}

// The error this thread's next cudaGetLastError would return (0: none pending).
int mp_test_pending_error() { return host_last; }

// This thread uses CUDA on `device` (cudaSetDevice).
void mp_test_set_device(int device) { cudaSetDevice(device); }

// This thread's current device, -1 where it has no context.
int mp_test_current_device() { return host_has_context ? host_device : -1; }

// The devices a context was created on, as a bit mask.
int64_t mp_test_contexts() {
  std::lock_guard<std::mutex> lock(host_mu);
  int64_t mask = 0;
  for (int d : host_contexts) mask |= int64_t(1) << d;
  return mask;
}

// Stands in for a libtorch static that frees a tensor at exit: the first call creates a static
// (destroyed after everything created later), the next ones set the block its destructor frees
// on device 0's default stream; it then prints the pool bytes still allocated.
void mp_test_free_at_exit(void* ptr) {
  static struct AtExit {
    void* ptr = nullptr;
    ~AtExit() {
      if (!ptr) return;
      mp_free(ptr, 0, 0, nullptr);
      int64_t v[13];
      mp_stats(v);
      std::printf("freed at exit; pool bytes %lld\n", (long long)v[4]);
      std::fflush(stdout);
    }
  } at_exit;
  at_exit.ptr = ptr;
}
#endif

}  // extern "C"
