// The index and conversion logic of the routing recorder, shared by the CPU and CUDA kernels.
//
// Everything here but the dispatch helpers (host-only: they pick a kernel instantiation before a
// launch) is __host__ __device__, so the CPU build (and therefore the CPU test suite) exercises
// exactly the code the CUDA kernels run. Nothing here allocates, syncs or throws.
// Functions are templated on the index type (int32/int64) and the storage type (uint8/int16) so
// the inner loops carry no per-element dtype branches; dispatch() picks the instantiation.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RR_HD __host__ __device__ __forceinline__
#else
#define RR_HD inline
#endif

namespace rr {

// Error kinds. The CPU backend returns the first one it finds; the CUDA backend counts them in
// RecorderView::error_counts[kind] (index 0 unused; the counts only grow) and the Python facade
// reports each gather's increase since the counts it last reported.
enum ErrorKind : int32_t {
  kOk = 0,
  kExpertOutOfRange = 1,  // an id outside [0, num_experts) that is not the -1 padding mark
  kSlotOutOfRange = 2,    // a slot outside [0, num_slots)
  kPartialPadding = 3,    // a row holding some -1 ids but not only -1 ids
};
constexpr int kNumErrorKinds = 4;

// The padding mark inference engines write into unused rows (SGLang: CUDA-graph padding).
constexpr int64_t kPaddingId = -1;

// A read-only array of int32 or int64 indices (slots, expert ids or a valid-row count).
struct IndexArray {
  const void* ptr = nullptr;
  int32_t bytes = 8;  // 4 or 8
};

// Raw views of one recorder's preallocated state. The Python facade owns the tensors.
struct RecorderView {
  void* ids = nullptr;                // [num_slots, num_layers, top_k], uint8 or int16
  uint32_t* valid_bits = nullptr;     // [num_slots, bit_words]: bit l set = layer l written
  int64_t* error_counts = nullptr;    // [kNumErrorKinds], CUDA backend only
  int64_t num_slots = 0;
  int32_t num_layers = 0;
  int32_t top_k = 0;
  int32_t num_experts = 0;
  int32_t bit_words = 0;              // ceil(num_layers / 32)
  int32_t id_bytes = 1;               // 1 (uint8) or 2 (int16)
  int32_t device = 0;                 // CUDA device index of the tensors (CUDA backend only)
};

// Calls fn(T{}) with T = Wide when `wide`, else Narrow: turns a runtime dtype into a template argument.
template <typename Narrow, typename Wide, typename Fn>
inline void dispatch_width(bool wide, Fn&& fn) {
  if (wide) {
    fn(Wide{});
  } else {
    fn(Narrow{});
  }
}

// The C++ type of an int32/int64 index array, and of a recorder's uint8/int16 storage.
template <typename Fn>
inline void dispatch_index(int32_t bytes, Fn&& fn) { dispatch_width<int32_t, int64_t>(bytes == 8, fn); }
template <typename Fn>
inline void dispatch_storage(int32_t id_bytes, Fn&& fn) { dispatch_width<uint8_t, int16_t>(id_bytes == 2, fn); }

template <typename I>
RR_HD const I* typed(IndexArray a) {
  return static_cast<const I*>(a.ptr);
}

RR_HD int64_t load_index(IndexArray a, int64_t i) {
  return a.bytes == 8 ? typed<int64_t>(a)[i] : static_cast<int64_t>(typed<int32_t>(a)[i]);
}

// How many leading rows to record: all of them, or fewer when the engine passes a valid-row
// count (possibly as a device scalar, so it can change between CUDA-graph replays).
RR_HD int64_t rows_to_record(int64_t n_rows, IndexArray valid_rows) {
  if (valid_rows.ptr == nullptr) return n_rows;
  const int64_t valid = load_index(valid_rows, 0);
  if (valid < 0) return 0;
  return valid < n_rows ? valid : n_rows;
}

RR_HD bool slot_in_range(const RecorderView& v, int64_t slot) {
  return slot >= 0 && slot < v.num_slots;
}

// Elements of one slot's row: num_layers * top_k ids.
RR_HD int64_t row_elems(const RecorderView& v) {
  return static_cast<int64_t>(v.num_layers) * v.top_k;
}

// Result of inspecting one [top_k] row of expert ids.
enum RowClass : int32_t { kStore = 0, kPadding = 1, kReject = 2 };

// Classifies one row of top_k ids. On kReject, *error and *bad_col say why and where.
template <typename I>
RR_HD int32_t classify_row(const I* row, int32_t top_k, int32_t num_experts, int32_t* error, int32_t* bad_col) {
  int32_t padding = 0;
  bool all_ok = true;
  for (int32_t k = 0; k < top_k; ++k) {
    padding += row[k] == I(kPaddingId);
    all_ok &= row[k] >= I(0) && row[k] < I(num_experts);
  }
  if (all_ok) return kStore;
  if (padding == top_k) return kPadding;
  // Slow path, only for bad rows: locate the first offending column.
  for (int32_t k = 0; k < top_k; ++k) {
    if (row[k] != I(kPaddingId) && (row[k] < I(0) || row[k] >= I(num_experts))) {
      *error = kExpertOutOfRange;
      *bad_col = k;
      return kReject;
    }
  }
  for (int32_t k = 0; k < top_k; ++k) {
    if (row[k] == I(kPaddingId)) {
      *error = kPartialPadding;
      *bad_col = k;
      break;
    }
  }
  return kReject;
}

RR_HD void set_bits(uint32_t* word, uint32_t mask) {
#if defined(__CUDA_ARCH__)
  atomicOr(word, mask);  // several rows of one record call may share a slot's word
#else
  *word |= mask;
#endif
}

// Converts one row of top_k ids (already classified kStore) to storage type S, writes it at
// (slot, layer) and marks that (slot, layer) written.
template <typename I, typename S>
RR_HD void store_row(const RecorderView& v, int32_t layer, int64_t slot, const I* row) {
  S* out = static_cast<S*>(v.ids) + slot * row_elems(v) + static_cast<int64_t>(layer) * v.top_k;
  for (int32_t k = 0; k < v.top_k; ++k) out[k] = static_cast<S>(row[k]);
  set_bits(v.valid_bits + slot * v.bit_words + layer / 32, 1u << (layer % 32));
}

// Whether `layer` of the slot whose validity words start at `words` was written.
RR_HD bool layer_written(const uint32_t* words, int32_t layer) {
  return (words[layer / 32] >> (layer % 32)) & 1u;
}

}  // namespace rr
