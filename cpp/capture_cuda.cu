// CUDA backend of the routing recorder. Every launch runs on the recorder's device (whatever the
// calling thread's current device is), is asynchronous on the caller's stream of that device and
// allocates nothing, so `record` can be captured in a CUDA graph and replayed. Bad rows are skipped
// (they read back as unwritten) and counted in error_counts, which only ever grow, instead of raising.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "routing_replay/capture_backend.h"

namespace rr::cuda {
namespace {

constexpr int kThreads = 256;

__device__ void count_error(const RecorderView& v, int32_t kind) {
  atomicAdd(reinterpret_cast<unsigned long long*>(v.error_counts + kind), 1ull);
}

// One thread per row. The valid-row count is read on the device, so a captured graph honours the
// value current at each replay.
template <typename Slot, typename Id, typename Store>
__global__ void record_kernel(RecorderView v, int32_t layer, const Slot* slots, const Id* ids, int64_t ids_stride,
                              int64_t n_rows, IndexArray valid_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows_to_record(n_rows, valid_rows)) return;
  int32_t error = kOk, col = 0;
  const int32_t cls = classify_row(ids + row * ids_stride, v.top_k, v.num_experts, &error, &col);
  if (cls == kPadding) return;
  if (cls == kReject) {
    count_error(v, error);
    return;
  }
  const int64_t slot = slots[row];
  if (!slot_in_range(v, slot)) {
    count_error(v, kSlotOutOfRange);
    return;
  }
  store_row<Id, Store>(v, layer, slot, ids + row * ids_stride);
}

// One thread per output element; threads with col < num_layers also write that layer's flag
// (row_elems = num_layers * top_k >= num_layers).
template <typename Store>
__global__ void gather_kernel(RecorderView v, IndexArray slots, int64_t n, Store* out_ids, uint8_t* out_valid) {
  const int64_t elems = row_elems(v);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * elems) return;
  const int64_t row = e / elems, col = e % elems;
  const int64_t slot = load_index(slots, row);
  const bool ok = slot_in_range(v, slot);
  if (!ok && col == 0) count_error(v, kSlotOutOfRange);
  out_ids[e] = ok ? static_cast<const Store*>(v.ids)[slot * elems + col] : Store(0);
  if (col < v.num_layers) {
    out_valid[row * v.num_layers + col] = ok && layer_written(v.valid_bits + slot * v.bit_words, col);
  }
}

__global__ void reset_kernel(RecorderView v, IndexArray slots, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * v.bit_words) return;
  const int64_t slot = load_index(slots, e / v.bit_words);
  if (!slot_in_range(v, slot)) {
    if (e % v.bit_words == 0) count_error(v, kSlotOutOfRange);
    return;
  }
  v.valid_bits[slot * v.bit_words + e % v.bit_words] = 0u;
}

// One thread per id element of a row; threads with col < bit_words also copy a validity word.
// A bad slot on either side skips the row and is counted once, in the destination's counters.
template <typename Store>
__global__ void copy_rows_kernel(RecorderView dst, RecorderView src, IndexArray src_slots, IndexArray dst_slots,
                                 int64_t n) {
  const int64_t elems = row_elems(dst);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * elems) return;
  const int64_t row = e / elems, col = e % elems;
  const int64_t from = load_index(src_slots, row), to = load_index(dst_slots, row);
  if (!slot_in_range(src, from) || !slot_in_range(dst, to)) {
    if (col == 0) count_error(dst, kSlotOutOfRange);
    return;
  }
  static_cast<Store*>(dst.ids)[to * elems + col] = static_cast<const Store*>(src.ids)[from * elems + col];
  if (col < dst.bit_words) dst.valid_bits[to * dst.bit_words + col] = src.valid_bits[from * src.bit_words + col];
}

unsigned int blocks_for(int64_t threads) { return static_cast<unsigned int>((threads + kThreads - 1) / kThreads); }

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // a failed runtime call also sets the last error: clear it, or the next call's
                       // launch check would report this failure again
  throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Makes the recorder's device current for one call and restores the caller's afterwards: a
// thread whose current device is another one must not launch there. cudaGetDevice/cudaSetDevice
// are not stream operations, so this is legal inside graph capture.
class DeviceGuard {
 public:
  explicit DeviceGuard(int32_t device) : target_(device) {
    check(cudaGetDevice(&previous_), "routing_replay: cudaGetDevice");
    if (previous_ != target_) check(cudaSetDevice(target_), "routing_replay: cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != target_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int32_t target_;
  int previous_ = 0;
};

void check_launch(const char* what) {
  // cudaGetLastError clears a launch error (a bad configuration, a missing kernel image), so the
  // next call starts clean: one failed launch raises once. It neither syncs nor touches a stream,
  // so it is safe inside graph capture. Sticky errors (a faulting kernel) stay, as CUDA wants.
  check(cudaGetLastError(), what);
}

}  // namespace

CallError record(const RecorderView& v, int32_t layer, IndexArray slots, IndexArray ids, int64_t ids_stride,
                 int64_t n_rows, IndexArray valid_rows, std::uintptr_t stream) {
  if (n_rows == 0) return {};
  const DeviceGuard on_device(v.device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_index(slots.bytes, [&](auto slot_type) {
    dispatch_index(ids.bytes, [&](auto id_type) {
      dispatch_storage(v.id_bytes, [&](auto store_type) {
        using Slot = decltype(slot_type);
        using Id = decltype(id_type);
        record_kernel<Slot, Id, decltype(store_type)><<<blocks_for(n_rows), kThreads, 0, s>>>(
            v, layer, typed<Slot>(slots), typed<Id>(ids), ids_stride, n_rows, valid_rows);
      });
    });
  });
  check_launch("routing_replay record kernel");
  return {};
}

CallError gather(const RecorderView& v, IndexArray slots, int64_t n, void* out_ids, uint8_t* out_valid,
                 std::uintptr_t stream) {
  if (n == 0) return {};
  const DeviceGuard on_device(v.device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_storage(v.id_bytes, [&](auto store_type) {
    using Store = decltype(store_type);
    gather_kernel<Store><<<blocks_for(n * row_elems(v)), kThreads, 0, s>>>(v, slots, n, static_cast<Store*>(out_ids),
                                                                           out_valid);
  });
  check_launch("routing_replay gather kernel");
  return {};
}

CallError reset(const RecorderView& v, IndexArray slots, int64_t n, std::uintptr_t stream) {
  if (n == 0) return {};
  const DeviceGuard on_device(v.device);
  reset_kernel<<<blocks_for(n * v.bit_words), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(v, slots, n);
  check_launch("routing_replay reset kernel");
  return {};
}

CallError copy_rows(const RecorderView& dst, const RecorderView& src, IndexArray src_slots, IndexArray dst_slots,
                    int64_t n, std::uintptr_t stream) {
  if (n == 0) return {};
  const DeviceGuard on_device(dst.device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_storage(dst.id_bytes, [&](auto store_type) {
    copy_rows_kernel<decltype(store_type)><<<blocks_for(n * row_elems(dst)), kThreads, 0, s>>>(dst, src, src_slots,
                                                                                            dst_slots, n);
  });
  check_launch("routing_replay copy_rows kernel");
  return {};
}

int32_t runtime_version() {
  int version = 0;
  check(cudaRuntimeGetVersion(&version), "routing_replay: cudaRuntimeGetVersion");
  return version;
}

int32_t driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) version = 0;  // no usable driver
  return version;
}

}  // namespace rr::cuda
