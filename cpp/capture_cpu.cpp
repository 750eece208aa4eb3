// CPU backend of the routing recorder. Single-threaded: one layer of a 4096-token batch is
// 32K ids, far below the cost of waking a thread pool.
#include <array>
#include <cstring>

#include "routing_replay/capture_backend.h"

namespace rr::cpu {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "kSpreadBits lays out bytes little-endian");

// Byte j of kSpreadBits[b] is bit j of b (0 or 1): expands 8 validity bits into 8 bool bytes
// with one lookup instead of 8 shifts and stores.
constexpr std::array<uint64_t, 256> make_spread_bits() {
  std::array<uint64_t, 256> table{};
  for (uint32_t b = 0; b < 256; ++b) {
    for (uint32_t j = 0; j < 8; ++j) table[b] |= static_cast<uint64_t>((b >> j) & 1u) << (8 * j);
  }
  return table;
}
constexpr std::array<uint64_t, 256> kSpreadBits = make_spread_bits();

// Writes one slot's num_layers written flags (0/1 bytes) from its validity words.
void expand_flags(const uint32_t* words, int32_t num_layers, uint8_t* flags) {
  int32_t layer = 0;
  for (; layer + 8 <= num_layers; layer += 8) {  // layer % 32 is 0, 8, 16 or 24: one word holds the byte
    std::memcpy(flags + layer, &kSpreadBits[(words[layer / 32] >> (layer % 32)) & 0xFFu], 8);
  }
  for (; layer < num_layers; ++layer) flags[layer] = layer_written(words, layer);
}

template <typename Slot, typename Id, typename Store>
CallError record_rows(const RecorderView& v, int32_t layer, const Slot* slots, const Id* ids, int64_t stride,
                      int64_t n) {
  const int32_t k = v.top_k;
  // Pass 1 validates, so a bad batch leaves the buffer untouched.
  for (int64_t row = 0; row < n; ++row) {
    int32_t error = kOk, col = 0;
    const int32_t cls = classify_row(ids + row * stride, k, v.num_experts, &error, &col);
    if (cls == kReject) return {error, row, col, static_cast<int64_t>(ids[row * stride + col])};
    if (cls == kStore && !slot_in_range(v, slots[row])) return {kSlotOutOfRange, row, 0, static_cast<int64_t>(slots[row])};
  }
  // Every row is now either valid or all padding, so its first id tells which. A slot repeated
  // in one call keeps its last row.
  for (int64_t row = 0; row < n; ++row) {
    if (ids[row * stride] != Id(kPaddingId)) store_row<Id, Store>(v, layer, slots[row], ids + row * stride);
  }
  return {};
}

CallError check_slots(const RecorderView& v, IndexArray slots, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = load_index(slots, i);
    if (!slot_in_range(v, slot)) return {kSlotOutOfRange, i, 0, slot};
  }
  return {};
}

}  // namespace

CallError record(const RecorderView& v, int32_t layer, IndexArray slots, IndexArray ids, int64_t ids_stride,
                 int64_t n_rows, IndexArray valid_rows, std::uintptr_t) {
  const int64_t n = rows_to_record(n_rows, valid_rows);
  CallError result;
  dispatch_index(slots.bytes, [&](auto slot_type) {
    dispatch_index(ids.bytes, [&](auto id_type) {
      dispatch_storage(v.id_bytes, [&](auto store_type) {
        using Slot = decltype(slot_type);
        using Id = decltype(id_type);
        result = record_rows<Slot, Id, decltype(store_type)>(v, layer, typed<Slot>(slots), typed<Id>(ids), ids_stride,
                                                             n);
      });
    });
  });
  return result;
}

CallError gather(const RecorderView& v, IndexArray slots, int64_t n, void* out_ids, uint8_t* out_valid,
                 std::uintptr_t) {
  const CallError bad = check_slots(v, slots, n);
  if (bad.kind != kOk) return bad;
  const int64_t row_bytes = row_elems(v) * v.id_bytes;
  const auto* src = static_cast<const uint8_t*>(v.ids);
  auto* dst = static_cast<uint8_t*>(out_ids);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = load_index(slots, i);
    std::memcpy(dst + i * row_bytes, src + slot * row_bytes, row_bytes);
    expand_flags(v.valid_bits + slot * v.bit_words, v.num_layers, out_valid + i * v.num_layers);
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

CallError copy_rows(const RecorderView& dst, const RecorderView& src, IndexArray src_slots, IndexArray dst_slots,
                    int64_t n, std::uintptr_t) {
  CallError bad = check_slots(src, src_slots, n);
  if (bad.kind == kOk) bad = check_slots(dst, dst_slots, n);
  if (bad.kind != kOk) return bad;
  const int64_t row_bytes = row_elems(dst) * dst.id_bytes;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t from = load_index(src_slots, i), to = load_index(dst_slots, i);
    std::memcpy(static_cast<uint8_t*>(dst.ids) + to * row_bytes, static_cast<const uint8_t*>(src.ids) + from * row_bytes,
                row_bytes);
    std::memcpy(dst.valid_bits + to * dst.bit_words, src.valid_bits + from * src.bit_words,
                sizeof(uint32_t) * dst.bit_words);
  }
  return {};
}

}  // namespace rr::cpu
