// Entry points of the two capture backends. Both take raw pointers that the Python facade has
// already validated (dtype, shape, device, contiguity), so the binary links no libtorch and one
// build serves any torch version.
#pragma once

#include <cstdint>

#include "routing_replay/routing_row.h"

namespace rr {

// The first problem found by a CPU call, or kind == kOk. row/col locate it in the input.
struct CallError {
  int32_t kind = kOk;
  int64_t row = 0;
  int32_t col = 0;
  int64_t value = 0;
};

// Both backends share one signature. The CPU backend validates everything first, writes nothing
// when any input is bad, returns the first problem, and ignores `stream`. The CUDA backend launches
// asynchronously on `stream` (a cudaStream_t of the view's device, made current for the call) with no
// allocation and no host sync, so `record` can
// be captured in a CUDA graph; it skips bad rows, counts them in v.error_counts (the facade reports
// them at gather) and always returns kOk.
#define RR_DECLARE_BACKEND                                                                              \
  /* Converts and scatters one layer's [n_rows, top_k] ids (row i at ids + i * ids_stride, so a    \
     column slice of a wider tensor needs no copy) into the rows of `slots`. */                        \
  CallError record(const RecorderView& v, int32_t layer, IndexArray slots, IndexArray ids,             \
                   int64_t ids_stride, int64_t n_rows, IndexArray valid_rows, std::uintptr_t stream);  \
  /* Copies the rows of `slots` to out_ids [n, L, K] and their written flags to out_valid [n, L]. */  \
  CallError gather(const RecorderView& v, IndexArray slots, int64_t n, void* out_ids,                  \
                   uint8_t* out_valid, std::uintptr_t stream);                                         \
  /* Marks every layer of `slots` unwritten. */                                                        \
  CallError reset(const RecorderView& v, IndexArray slots, int64_t n, std::uintptr_t stream);          \
  /* Copies whole rows (ids and written flags) of src at src_slots to dst at dst_slots; same layout. */ \
  CallError copy_rows(const RecorderView& dst, const RecorderView& src, IndexArray src_slots,           \
                      IndexArray dst_slots, int64_t n, std::uintptr_t stream);

namespace cpu {
RR_DECLARE_BACKEND
}  // namespace cpu

namespace cuda {
RR_DECLARE_BACKEND
// The CUDA runtime this module links (statically) and the installed driver's CUDA version, both as
// 1000 * major + 10 * minor; the driver's is 0 without a driver.
int32_t runtime_version();
int32_t driver_version();
}  // namespace cuda

#undef RR_DECLARE_BACKEND

}  // namespace rr
