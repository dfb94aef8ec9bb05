// fusedclip._C: the Python face of the CPU and CUDA kernels.
//
// Every function takes plain integers (addresses, counts, dtype codes, a stream handle) and
// floats: no torch headers, so the module builds without torch and serves any torch version. The
// Python side (fusedclip/backends/cpu_backend.py, cuda_backend.py) allocates the outputs and
// passes their addresses. Kernels run with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/chunk_kernels.h"
#include "cpu/cpu_ops.h"
#include "cpu/work_ranges.h"
#include "cpu/thread_pool.h"
#include "fusedclip.h"
#include "gather.h"
#if defined(FUSEDCLIP_HAVE_CUDA)
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using fusedclip::valid_dtype;

namespace {

#ifndef FUSEDCLIP_CUDA_ARCHS
#define FUSEDCLIP_CUDA_ARCHS ""
#endif

template <class T>
T* as_pointer(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

void check_plan(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements) {
  if (packed == 0) throw std::invalid_argument("fusedclip._C: null table address");
  if (num_tensors < 0 || num_chunks < 0 || chunk_elements <= 0) {
    throw std::invalid_argument("fusedclip._C: negative table sizes or non-positive chunk size");
  }
}

void check_dtype(int64_t code, const char* what) {
  if (!valid_dtype(code)) {
    throw std::invalid_argument(std::string("fusedclip._C: ") + what + " must be a dtype code 0-3 (float32, float16, bfloat16, float64)");
  }
}

void check_kind(int64_t kind) {
  if (kind < fusedclip::kSumPow || kind > fusedclip::kCount) throw std::invalid_argument("fusedclip._C: unknown norm kind");
}

fusedclip::cpu::PlanArgs cpu_plan(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                                  int64_t total_elements, int64_t threads) {
  check_plan(packed, num_tensors, num_chunks, chunk_elements);
  if (num_chunks >= fusedclip::cpu::WorkRanges::kMaxChunks) {
    throw std::invalid_argument("fusedclip._C: the CPU kernels take at most 2^32 - 1 chunks per call");
  }
  fusedclip::cpu::PlanArgs plan;
  plan.packed = as_pointer<const int64_t>(packed);
  plan.num_tensors = num_tensors;
  plan.num_chunks = num_chunks;
  plan.chunk_elements = chunk_elements;
  plan.total_elements = total_elements;
  plan.threads = threads < 1 ? 1 : static_cast<int>(threads > 1024 ? 1024 : threads);
  return plan;
}

void cpu_norm(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements, int64_t total_elements,
              int64_t threads, int64_t kind, double p, int64_t total_out, int64_t total_dtype, int64_t acc_out,
              int64_t coef_out, double max_norm, int64_t per_tensor_out, int64_t scale_ptr, int64_t scale_dtype,
              int64_t norm_scale_ptr) {
  const fusedclip::cpu::PlanArgs plan = cpu_plan(packed, num_tensors, num_chunks, chunk_elements, total_elements, threads);
  check_kind(kind);
  check_dtype(total_dtype, "total_dtype");
  if (total_out == 0 || acc_out == 0) throw std::invalid_argument("fusedclip._C: null output address");
  fusedclip::cpu::NormArgs args;
  args.kind = static_cast<int>(kind);
  args.p = p;
  args.total_out = as_pointer<void>(total_out);
  args.total_dtype = static_cast<int>(total_dtype);
  args.acc_out = as_pointer<double>(acc_out);
  args.coef_out = as_pointer<double>(coef_out);
  args.max_norm = max_norm;
  args.per_tensor_out = as_pointer<double>(per_tensor_out);
  args.has_scale = scale_ptr != 0;
  args.scale = 1.0;
  if (args.has_scale) {
    check_dtype(scale_dtype, "scale_dtype");
    args.scale = fusedclip::read_scalar(as_pointer<const void>(scale_ptr), static_cast<int>(scale_dtype));
  }
  // general p: the float64 norm scale M (see fusedclip.h); other kinds ignore it
  args.norm_scale = 1.0;
  if (norm_scale_ptr != 0 && kind == fusedclip::kSumPow && p != 1.0 && p != 2.0) {
    args.norm_scale = fusedclip::usable_norm_scale(*as_pointer<const double>(norm_scale_ptr));
  }
  py::gil_scoped_release release;
  fusedclip::cpu::norm(plan, args);
}

void cpu_scale(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements, int64_t total_elements,
               int64_t threads, int64_t coef_ptr, int64_t coef_dtype) {
  const fusedclip::cpu::PlanArgs plan = cpu_plan(packed, num_tensors, num_chunks, chunk_elements, total_elements, threads);
  check_dtype(coef_dtype, "coef_dtype");
  if (coef_ptr == 0) throw std::invalid_argument("fusedclip._C: null coefficient address");
  const double coef = fusedclip::read_scalar(as_pointer<const void>(coef_ptr), static_cast<int>(coef_dtype));
  py::gil_scoped_release release;
  fusedclip::cpu::scale(plan, coef);
}

void cpu_clamp(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements, int64_t total_elements,
               int64_t threads, double clip_value) {
  const fusedclip::cpu::PlanArgs plan = cpu_plan(packed, num_tensors, num_chunks, chunk_elements, total_elements, threads);
  py::gil_scoped_release release;
  fusedclip::cpu::clamp(plan, clip_value);
}

std::vector<std::string> cpu_supported_isas() {
  int count = 0;
  const char* const* names = fusedclip::cpu::supported_isas(&count);
  return std::vector<std::string>(names, names + count);
}

#if defined(FUSEDCLIP_HAVE_CUDA)

fusedclip::cuda::PlanArgs cuda_plan(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                                    int64_t device, int64_t stream) {
  check_plan(packed, num_tensors, num_chunks, chunk_elements);
  fusedclip::cuda::PlanArgs plan;
  plan.packed = as_pointer<const int64_t>(packed);
  plan.num_tensors = num_tensors;
  plan.num_chunks = num_chunks;
  plan.chunk_elements = chunk_elements;
  plan.device = static_cast<int>(device);
  plan.stream = as_pointer<void>(stream);
  return plan;
}

void raise_if(const char* error) {
  if (error != nullptr) throw std::runtime_error(std::string("fusedclip CUDA kernel: ") + error);
}

int64_t cuda_norm_units(int64_t device, int64_t num_chunks, int64_t chunk_elements) {
  const char* error = nullptr;
  const int64_t units = fusedclip::cuda::norm_units(static_cast<int>(device), num_chunks, chunk_elements, &error);
  raise_if(error);
  return units;
}

void cuda_norm(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements, int64_t device,
               int64_t stream, int64_t kind, double p, int64_t total_out, int64_t total_dtype, int64_t acc_out,
               int64_t coef_out, double max_norm, int64_t max_norm_ptr, int64_t max_norm_dtype, int64_t scale_ptr,
               int64_t scale_dtype, int64_t per_tensor_out, int64_t partials, int64_t counters,
               int64_t norm_scale_ptr) {
  const fusedclip::cuda::PlanArgs plan = cuda_plan(packed, num_tensors, num_chunks, chunk_elements, device, stream);
  check_kind(kind);
  check_dtype(total_dtype, "total_dtype");
  if (max_norm_ptr != 0) check_dtype(max_norm_dtype, "max_norm_dtype");
  if (scale_ptr != 0) check_dtype(scale_dtype, "scale_dtype");
  if (total_out == 0 || acc_out == 0 || partials == 0 || counters == 0) {
    throw std::invalid_argument("fusedclip._C: null output or workspace address");
  }
  fusedclip::cuda::NormArgs args;
  args.kind = static_cast<int>(kind);
  args.p = p;
  args.total_out = as_pointer<void>(total_out);
  args.total_dtype = static_cast<int>(total_dtype);
  args.acc_out = as_pointer<double>(acc_out);
  args.coef_out = as_pointer<double>(coef_out);
  args.max_norm = max_norm;
  args.max_norm_ptr = as_pointer<const void>(max_norm_ptr);
  args.max_norm_dtype = static_cast<int>(max_norm_dtype);
  args.scale_ptr = as_pointer<const void>(scale_ptr);
  args.scale_dtype = static_cast<int>(scale_dtype);
  // general p: a 0-d float64 device tensor M (see fusedclip.h), read by the kernel; 0 for none
  args.norm_scale_ptr = as_pointer<const double>(norm_scale_ptr);
  args.per_tensor_out = as_pointer<double>(per_tensor_out);
  args.partials = as_pointer<double>(partials);
  args.ticket = as_pointer<unsigned int>(counters);
  const char* error;
  {
    py::gil_scoped_release release;
    error = fusedclip::cuda::norm(plan, args);
  }
  raise_if(error);
}

void cuda_scale(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements, int64_t device,
                int64_t stream, int64_t coef_ptr, int64_t coef_dtype) {
  const fusedclip::cuda::PlanArgs plan = cuda_plan(packed, num_tensors, num_chunks, chunk_elements, device, stream);
  check_dtype(coef_dtype, "coef_dtype");
  if (coef_ptr == 0) throw std::invalid_argument("fusedclip._C: null coefficient address");
  const char* error;
  {
    py::gil_scoped_release release;
    error = fusedclip::cuda::scale(plan, as_pointer<const void>(coef_ptr), static_cast<int>(coef_dtype));
  }
  raise_if(error);
}

void cuda_clamp(int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements, int64_t device,
                int64_t stream, double clip_value) {
  const fusedclip::cuda::PlanArgs plan = cuda_plan(packed, num_tensors, num_chunks, chunk_elements, device, stream);
  const char* error;
  {
    py::gil_scoped_release release;
    error = fusedclip::cuda::clamp(plan, clip_value);
  }
  raise_if(error);
}

py::tuple cuda_device_count() {
  const char* error = nullptr;
  const int count = fusedclip::cuda::device_count(&error);
  return py::make_tuple(count, error == nullptr ? py::object(py::none()) : py::object(py::str(error)));
}

#endif  // FUSEDCLIP_HAVE_CUDA

py::dict build_info() {
  py::dict info;
#if defined(FUSEDCLIP_HAVE_CUDA)
  info["has_cuda"] = true;
#else
  info["has_cuda"] = false;
#endif
  info["cuda_archs"] = std::string(FUSEDCLIP_CUDA_ARCHS);
  std::vector<std::string> compiled{"base"};
#if defined(FUSEDCLIP_HAVE_AVX2)
  compiled.push_back("avx2");
  compiled.push_back("avx512");
#endif
  info["cpu_isas_compiled"] = compiled;
  info["cpu_isas_supported"] = cpu_supported_isas();
  info["cpu_isa"] = std::string(fusedclip::cpu::active_kernels().isa);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedclip's compiled kernels: multithreaded CPU loops and (when built with nvcc) CUDA kernels";
  m.def("build_info", &build_info, "What this build contains: CUDA or not, CUDA architectures, CPU instruction sets");

  m.def("cpu_norm", &cpu_norm, "Total norm (and coefficient, per-tensor norms) of a plan's CPU tensors",
        py::arg("packed"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"),
        py::arg("total_elements"), py::arg("threads"), py::arg("kind"), py::arg("p"), py::arg("total_out"),
        py::arg("total_dtype"), py::arg("acc_out"), py::arg("coef_out"), py::arg("max_norm"),
        py::arg("per_tensor_out"), py::arg("scale_ptr"), py::arg("scale_dtype"), py::arg("norm_scale_ptr") = 0);
  m.def("cpu_scale", &cpu_scale, "Multiply a plan's CPU tensors by the coefficient at coef_ptr (nothing when it is 1)",
        py::arg("packed"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"),
        py::arg("total_elements"), py::arg("threads"), py::arg("coef_ptr"), py::arg("coef_dtype"));
  m.def("cpu_clamp", &cpu_clamp, "Clamp a plan's CPU tensors to [-clip_value, clip_value]", py::arg("packed"),
        py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"), py::arg("total_elements"),
        py::arg("threads"), py::arg("clip_value"));
  m.def(
      "cpu_stats",
      [] {
        const fusedclip::cpu::Stats s = fusedclip::cpu::stats();
        py::dict d;
        d["norm_passes"] = s.norm_passes;
        d["scale_passes"] = s.scale_passes;
        d["clamp_passes"] = s.clamp_passes;
        d["last_threads"] = s.last_threads;
        d["norm_participants"] = s.norm_participants;
        d["elementwise_participants"] = s.elementwise_participants;
        return d;
      },
      "Passes over the data run so far by the CPU kernels, the threads the last one asked for, and how many"
      " processed chunks in the last norm and the last scale/clamp pass (for tests)");
  m.def(
      "gather_grads",
      [](py::object params, py::object plain_types, py::object descriptors) {
        PyObject* result = fusedclip::gather_grads(params.ptr(), plain_types.ptr(), descriptors.ptr());
        if (result == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(result);
      },
      "(grads, key columns, any null address) of a parameter list in one pass, or None"
      " when the fast path does not apply (see csrc/gather.h)",
      py::arg("params"), py::arg("plain_types"), py::arg("descriptors"));
  m.def(
      "cpu_work_claims",
      [](int64_t chunks, int threads, int64_t grain, bool backwards, const std::vector<int>& workers) {
        if (chunks < 0 || chunks >= fusedclip::cpu::WorkRanges::kMaxChunks || threads < 1 || workers.empty()) {
          throw std::invalid_argument("fusedclip._C: cpu_work_claims needs 0 <= chunks < 2^32, threads >= 1, workers");
        }
        for (int w : workers) {
          if (w < 0 || w >= threads) throw std::invalid_argument("fusedclip._C: a worker index is out of range");
        }
        fusedclip::cpu::WorkRanges ranges(chunks, threads, grain, backwards);
        std::vector<py::tuple> claims;
        bool any = true;
        while (any) {  // the listed workers claim in turn until none gets anything
          any = false;
          for (int w : workers) {
            int64_t begin, end;
            if (ranges.claim(w, &begin, &end)) {
              claims.push_back(py::make_tuple(w, begin, end));
              any = true;
            }
          }
        }
        return claims;
      },
      "How a pass shares chunks out (a test hook): the (worker, begin, end) claims the listed workers get, in turn",
      py::arg("chunks"), py::arg("threads"), py::arg("grain"), py::arg("backwards"), py::arg("workers"));
  m.def("cpu_parallel_runtime", [] { return std::string(fusedclip::cpu::parallel_runtime()); },
        "Where the CPU passes run their threads: the loaded OpenMP runtime's path (torch's) or 'pool'");
  m.def("cpu_isa", [] { return std::string(fusedclip::cpu::active_kernels().isa); },
        "The instruction set of the CPU loops in use");
  m.def("cpu_select_isa", [](const std::string& name) { return fusedclip::cpu::select_isa(name.c_str()); },
        "Use the CPU loops compiled for `name` (one of build_info()['cpu_isas_supported']); False if unsupported",
        py::arg("name"));

#if defined(FUSEDCLIP_HAVE_CUDA)
  m.def("cuda_device_count", &cuda_device_count, "(devices visible to the CUDA runtime, error message or None)");
  m.def("cuda_norm_units", &cuda_norm_units, "Float64 slots of the norm workspace for a plan on a device",
        py::arg("device"), py::arg("num_chunks"), py::arg("chunk_elements"));
  m.def("cuda_norm", &cuda_norm, "One launch: total norm, coefficient, per-tensor norms of a plan's CUDA tensors",
        py::arg("packed"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"), py::arg("device"),
        py::arg("stream"), py::arg("kind"), py::arg("p"), py::arg("total_out"), py::arg("total_dtype"),
        py::arg("acc_out"), py::arg("coef_out"), py::arg("max_norm"), py::arg("max_norm_ptr"),
        py::arg("max_norm_dtype"), py::arg("scale_ptr"), py::arg("scale_dtype"), py::arg("per_tensor_out"),
        py::arg("partials"), py::arg("counters"), py::arg("norm_scale_ptr") = 0);
  m.def("cuda_scale", &cuda_scale, "One launch: multiply by the coefficient at coef_ptr unless it is 1",
        py::arg("packed"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"), py::arg("device"),
        py::arg("stream"), py::arg("coef_ptr"), py::arg("coef_dtype"));
  m.def("cuda_clamp", &cuda_clamp, "One launch: clamp to [-clip_value, clip_value]", py::arg("packed"),
        py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"), py::arg("device"),
        py::arg("stream"), py::arg("clip_value"));
#endif
}
