// CUDA backend of the routing recorder. Every launch is asynchronous on the caller's stream and
// allocates nothing, so `record` can be captured in a CUDA graph and replayed. Bad rows are
// skipped (they read back as unwritten) and counted in error_counts instead of raising.
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

__global__ void record_kernel(RecorderView v, int32_t layer, IndexArray slots, IndexArray ids,
                              int64_t n_rows, IndexArray valid_rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows_to_record(n_rows, valid_rows)) return;
  int32_t error = kOk, col = 0;
  const int32_t cls = classify_row(ids, row, v.top_k, v.num_experts, &error, &col);
  if (cls == kPadding) return;
  if (cls == kReject) {
    count_error(v, error);
    return;
  }
  const int64_t slot = load_index(slots, row);
  if (!slot_in_range(v, slot)) {
    count_error(v, kSlotOutOfRange);
    return;
  }
  store_row(v, layer, slot, ids, row);
}

// One thread per stored element of the output; threads with col < bit_words also copy the
// validity word (row_elems >= bit_words always holds since top_k >= 1).
template <typename T>
__global__ void gather_kernel(RecorderView v, IndexArray slots, int64_t n, T* out_ids, uint32_t* out_bits) {
  const int64_t elems = row_elems(v);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * elems) return;
  const int64_t row = e / elems, col = e % elems;
  const int64_t slot = load_index(slots, row);
  const bool ok = slot_in_range(v, slot);
  if (!ok && col == 0) count_error(v, kSlotOutOfRange);
  out_ids[e] = ok ? static_cast<const T*>(v.ids)[slot * elems + col] : T(0);
  if (col < v.bit_words) out_bits[row * v.bit_words + col] = ok ? v.valid_bits[slot * v.bit_words + col] : 0u;
}

__global__ void reset_kernel(RecorderView v, IndexArray slots, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * v.bit_words) return;
  const int64_t row = e / v.bit_words;
  const int64_t slot = load_index(slots, row);
  if (!slot_in_range(v, slot)) {
    if (e % v.bit_words == 0) count_error(v, kSlotOutOfRange);
    return;
  }
  v.valid_bits[slot * v.bit_words + e % v.bit_words] = 0u;
}

unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>((threads + kThreads - 1) / kThreads);
}

void check_launch(const char* what) {
  // cudaPeekAtLastError does not sync and does not clear sticky errors: safe inside capture.
  const cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

CallError record(const RecorderView& v, int32_t layer, IndexArray slots, IndexArray ids, int64_t n_rows,
                 IndexArray valid_rows, std::uintptr_t stream) {
  if (n_rows == 0) return {};
  record_kernel<<<blocks_for(n_rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      v, layer, slots, ids, n_rows, valid_rows);
  check_launch("routing_replay record kernel");
  return {};
}

CallError gather(const RecorderView& v, IndexArray slots, int64_t n, void* out_ids, uint32_t* out_bits,
                 std::uintptr_t stream) {
  if (n == 0) return {};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned int blocks = blocks_for(n * row_elems(v));
  if (v.id_bytes == 1) {
    gather_kernel<uint8_t><<<blocks, kThreads, 0, s>>>(v, slots, n, static_cast<uint8_t*>(out_ids), out_bits);
  } else {
    gather_kernel<int16_t><<<blocks, kThreads, 0, s>>>(v, slots, n, static_cast<int16_t*>(out_ids), out_bits);
  }
  check_launch("routing_replay gather kernel");
  return {};
}

CallError reset(const RecorderView& v, IndexArray slots, int64_t n, std::uintptr_t stream) {
  if (n == 0) return {};
  reset_kernel<<<blocks_for(n * v.bit_words), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(v, slots, n);
  check_launch("routing_replay reset kernel");
  return {};
}

}  // namespace rr::cuda
