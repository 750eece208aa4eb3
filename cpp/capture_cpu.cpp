// CPU backend of the routing recorder. Single-threaded: one layer of a 4096-token batch is
// 32K ids, far below the cost of waking a thread pool.
#include <cstring>

#include "routing_replay/capture_backend.h"

namespace rr::cpu {

CallError record(const RecorderView& v, int32_t layer, IndexArray slots, IndexArray ids,
                 int64_t n_rows, IndexArray valid_rows, std::uintptr_t) {
  const int64_t n = rows_to_record(n_rows, valid_rows);
  // Pass 1 validates, so a bad batch leaves the buffer untouched.
  for (int64_t row = 0; row < n; ++row) {
    int32_t error = kOk, col = 0;
    const int32_t cls = classify_row(ids, row, v.top_k, v.num_experts, &error, &col);
    if (cls == kReject) return {error, row, col, load_index(ids, row * v.top_k + col)};
    const int64_t slot = load_index(slots, row);
    if (cls == kStore && !slot_in_range(v, slot)) return {kSlotOutOfRange, row, 0, slot};
  }
  for (int64_t row = 0; row < n; ++row) {
    int32_t error = kOk, col = 0;
    if (classify_row(ids, row, v.top_k, v.num_experts, &error, &col) == kStore) {
      store_row(v, layer, load_index(slots, row), ids, row);
    }
  }
  return {};
}

static CallError check_slots(const RecorderView& v, IndexArray slots, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = load_index(slots, i);
    if (!slot_in_range(v, slot)) return {kSlotOutOfRange, i, 0, slot};
  }
  return {};
}

CallError gather(const RecorderView& v, IndexArray slots, int64_t n, void* out_ids, uint32_t* out_bits,
                 std::uintptr_t) {
  const CallError bad = check_slots(v, slots, n);
  if (bad.kind != kOk) return bad;
  const int64_t row_bytes = row_elems(v) * v.id_bytes;
  const auto* src = static_cast<const uint8_t*>(v.ids);
  auto* dst = static_cast<uint8_t*>(out_ids);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = load_index(slots, i);
    std::memcpy(dst + i * row_bytes, src + slot * row_bytes, row_bytes);
    std::memcpy(out_bits + i * v.bit_words, v.valid_bits + slot * v.bit_words,
                sizeof(uint32_t) * v.bit_words);
  }
  return {};
}

CallError reset(const RecorderView& v, IndexArray slots, int64_t n, std::uintptr_t) {
  const CallError bad = check_slots(v, slots, n);
  if (bad.kind != kOk) return bad;
  for (int64_t i = 0; i < n; ++i) {
    std::memset(v.valid_bits + load_index(slots, i) * v.bit_words, 0, sizeof(uint32_t) * v.bit_words);
  }
  return {};
}

}  // namespace rr::cpu
