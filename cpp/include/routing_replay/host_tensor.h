// Fresh host tensors handed to torch through DLPack, so the CPU gather allocates its outputs and
// fills them in one native call (two torch.empty calls cost more than a small gather itself).
//
// The structs are the stable, unversioned DLPack ABI (dlpack.h v0.8: DLDevice, DLDataType,
// DLTensor, DLManagedTensor), declared here so the build needs no torch or dlpack headers.
// Each tensor is one allocation: header, shape, then the data, 64-byte aligned; its deleter, which
// the consumer (torch) calls when the tensor's storage dies, frees the whole block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>

namespace rr::dlpack {

struct Device {
  int32_t device_type;  // a C enum (int) in dlpack.h
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

static_assert(sizeof(Tensor) == 48 && sizeof(ManagedTensor) == 64, "DLPack ABI layout (64-bit)");

constexpr int32_t kCpu = 1;                           // kDLCPU
constexpr uint8_t kInt = 0, kUInt = 1, kBool = 6;     // kDLInt, kDLUInt, kDLBool
constexpr const char* kCapsuleName = "dltensor";      // renamed "used_dltensor" by the consumer

constexpr int kMaxDims = 3;
constexpr std::size_t kAlign = 64;

struct Header {
  ManagedTensor managed;  // first member: the deleter frees the block through it
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];  // in elements, as DLPack counts them
};
constexpr std::size_t kDataOffset = (sizeof(Header) + kAlign - 1) / kAlign * kAlign;

inline void free_block(ManagedTensor* self) { std::free(self); }

// A new uninitialised contiguous host tensor of `ndim` dims (at most kMaxDims) and element type
// `dtype`; throws std::bad_alloc. The caller owns it until it calls managed->deleter.
inline ManagedTensor* new_host_tensor(DataType dtype, const int64_t* shape, int32_t ndim) {
  if (ndim < 0 || ndim > kMaxDims) throw std::invalid_argument("new_host_tensor: at most 3 dimensions");
  std::size_t bytes = dtype.bits / 8;
  for (int32_t d = 0; d < ndim; ++d) bytes *= static_cast<std::size_t>(shape[d]);
  const std::size_t total = (kDataOffset + bytes + kAlign - 1) / kAlign * kAlign;  // aligned_alloc's rule
  void* block = std::aligned_alloc(kAlign, total);
  if (block == nullptr) throw std::bad_alloc();
  auto* header = new (block) Header{};
  int64_t stride = 1;
  for (int32_t d = ndim - 1; d >= 0; --d) {
    header->shape[d] = shape[d];
    header->strides[d] = stride;
    stride *= shape[d];
  }
  Tensor& t = header->managed.dl_tensor;
  t.data = static_cast<uint8_t*>(block) + kDataOffset;
  t.device = {kCpu, 0};
  t.ndim = ndim;
  t.dtype = dtype;
  t.shape = header->shape;
  t.strides = header->strides;
  t.byte_offset = 0;
  header->managed.manager_ctx = nullptr;
  header->managed.deleter = &free_block;
  return &header->managed;
}

}  // namespace rr::dlpack
