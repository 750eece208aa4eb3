// pybind11 bindings, compiled once per backend: RR_BACKEND_CUDA selects the CUDA entry points and
// the module name. Both modules expose record, reset and copy_rows alike; gathering differs: the
// CUDA module's `gather` fills device tensors the facade allocated (then copied to pinned memory
// asynchronously), the CPU module's `gather_new` allocates its host outputs itself and returns them
// as DLPack capsules, which saves the two torch allocations that dominate a small gather.
// Every argument is a plain integer (pointers included): the facade validates tensors first.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <tuple>

#include "routing_replay/capture_backend.h"
#include "routing_replay/host_tensor.h"

namespace py = pybind11;

namespace {

using ErrorTuple = std::tuple<int32_t, int64_t, int32_t, int64_t>;

ErrorTuple to_tuple(const rr::CallError& e) { return {e.kind, e.row, e.col, e.value}; }

rr::IndexArray index_array(std::uintptr_t ptr, int32_t bytes) {
  return {reinterpret_cast<const void*>(ptr), bytes};
}

rr::RecorderView make_view(std::uintptr_t ids, std::uintptr_t valid_bits, std::uintptr_t error_counts,
                           int64_t num_slots, int32_t num_layers, int32_t top_k, int32_t num_experts,
                           int32_t id_bytes, int32_t device) {
  rr::RecorderView v;
  v.ids = reinterpret_cast<void*>(ids);
  v.valid_bits = reinterpret_cast<uint32_t*>(valid_bits);
  v.error_counts = reinterpret_cast<int64_t*>(error_counts);
  v.num_slots = num_slots;
  v.num_layers = num_layers;
  v.top_k = top_k;
  v.num_experts = num_experts;
  v.bit_words = (num_layers + 31) / 32;
  v.id_bytes = id_bytes;
  v.device = device;
  return v;
}

#ifdef RR_BACKEND_CUDA
namespace backend = rr::cuda;
#define RR_MODULE _capture_cuda
#else
namespace backend = rr::cpu;
#define RR_MODULE _capture_cpu

struct DeleteTensor {
  void operator()(rr::dlpack::ManagedTensor* t) const { t->deleter(t); }
};
using OwnedTensor = std::unique_ptr<rr::dlpack::ManagedTensor, DeleteTensor>;

// Capsule destructor: frees the tensor unless a consumer took it (and renamed the capsule).
void release_unconsumed(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, rr::dlpack::kCapsuleName)) {
    DeleteTensor{}(static_cast<rr::dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, rr::dlpack::kCapsuleName)));
  }
}

py::object to_capsule(OwnedTensor tensor) {
  PyObject* capsule = PyCapsule_New(tensor.get(), rr::dlpack::kCapsuleName, &release_unconsumed);
  if (capsule == nullptr) throw py::error_already_set();
  tensor.release();  // the capsule owns it now
  return py::reinterpret_steal<py::object>(capsule);
}

// Copies of at least this many bytes run with the GIL released; for smaller ones releasing and
// re-taking it costs more than the copy.
constexpr int64_t kReleaseGilBytes = 64 * 1024;

// (None, ids, valid) with ids [n, L, K] (uint8 or int16, the view's storage) and valid [n, L] bool
// as DLPack capsules, or ((kind, row, col, value), None, None) when a slot is out of range.
py::tuple gather_new(const rr::RecorderView& v, std::uintptr_t slots, int32_t slots_bytes, int64_t n) {
  const int64_t shape[3] = {n, v.num_layers, v.top_k};
  const rr::dlpack::DataType id_type =
      v.id_bytes == 2 ? rr::dlpack::DataType{rr::dlpack::kInt, 16, 1} : rr::dlpack::DataType{rr::dlpack::kUInt, 8, 1};
  OwnedTensor ids(rr::dlpack::new_host_tensor(id_type, shape, 3));
  OwnedTensor valid(rr::dlpack::new_host_tensor({rr::dlpack::kBool, 8, 1}, shape, 2));
  rr::CallError error;
  const auto run = [&] {
    error = rr::cpu::gather(v, index_array(slots, slots_bytes), n, ids->dl_tensor.data,
                            static_cast<uint8_t*>(valid->dl_tensor.data), 0);
  };
  if (n * rr::row_elems(v) * v.id_bytes >= kReleaseGilBytes) {
    py::gil_scoped_release release;
    run();
  } else {
    run();
  }
  if (error.kind != rr::kOk) return py::make_tuple(to_tuple(error), py::none(), py::none());
  return py::make_tuple(py::none(), to_capsule(std::move(ids)), to_capsule(std::move(valid)));
}
#endif

}  // namespace

PYBIND11_MODULE(RR_MODULE, m) {
  m.doc() = "Native routing-recorder kernels; use routing_replay.capture, not this module.";
  m.attr("NUM_ERROR_KINDS") = rr::kNumErrorKinds;

  // module_local: the CPU and CUDA modules each register their own copy of this type.
  py::class_<rr::RecorderView>(m, "RecorderView", py::module_local())
      .def(py::init(&make_view), py::arg("ids"), py::arg("valid_bits"), py::arg("error_counts"),
           py::arg("num_slots"), py::arg("num_layers"), py::arg("top_k"), py::arg("num_experts"),
           py::arg("id_bytes"), py::arg("device"))
      .def_readonly("num_slots", &rr::RecorderView::num_slots)
      .def_readonly("num_experts", &rr::RecorderView::num_experts);

  m.def(
      "record",
      [](const rr::RecorderView& v, int32_t layer, std::uintptr_t slots, int32_t slots_bytes,
         std::uintptr_t ids, int32_t ids_bytes, int64_t ids_stride, int64_t n_rows, std::uintptr_t valid,
         int32_t valid_bytes, std::uintptr_t stream) {
        return to_tuple(backend::record(v, layer, index_array(slots, slots_bytes), index_array(ids, ids_bytes),
                                        ids_stride, n_rows, index_array(valid, valid_bytes), stream));
      },
      py::call_guard<py::gil_scoped_release>());
#ifdef RR_BACKEND_CUDA
  m.def("runtime_version", &rr::cuda::runtime_version,
        "CUDA runtime version this module links, 1000 * major + 10 * minor");
  m.def("driver_version", &rr::cuda::driver_version,
        "the installed driver's CUDA version, 1000 * major + 10 * minor (0: no driver)");
  m.def(
      "gather",
      [](const rr::RecorderView& v, std::uintptr_t slots, int32_t slots_bytes, int64_t n,
         std::uintptr_t out_ids, std::uintptr_t out_valid, std::uintptr_t stream) {
        return to_tuple(backend::gather(v, index_array(slots, slots_bytes), n, reinterpret_cast<void*>(out_ids),
                                        reinterpret_cast<uint8_t*>(out_valid), stream));
      },
      py::call_guard<py::gil_scoped_release>());
#else
  m.def("gather_new", &gather_new);
#endif
  m.def(
      "reset",
      [](const rr::RecorderView& v, std::uintptr_t slots, int32_t slots_bytes, int64_t n, std::uintptr_t stream) {
        return to_tuple(backend::reset(v, index_array(slots, slots_bytes), n, stream));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "copy_rows",
      [](const rr::RecorderView& dst, const rr::RecorderView& src, std::uintptr_t src_slots, int32_t src_bytes,
         std::uintptr_t dst_slots, int32_t dst_bytes, int64_t n, std::uintptr_t stream) {
        return to_tuple(backend::copy_rows(dst, src, index_array(src_slots, src_bytes),
                                           index_array(dst_slots, dst_bytes), n, stream));
      },
      py::call_guard<py::gil_scoped_release>());
}
