// fusedclip._C: the Python face of the CPU and CUDA kernels.
//
// Launches take two small structs with named fields (Tables: a plan's tables; NormArgs: one norm
// launch), built and checked once on the Python side, plus plain integers (addresses, a stream
// handle) for the rest: no torch headers, so the module builds without torch and serves any torch version. The
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

// A plan's kernel tables, as the Python side describes them (fusedclip/plan.py, KernelTables).
struct Tables {
  int64_t packed = 0;          // address of the packed int64 table buffer (on the grads' device)
  int64_t num_tensors = 0;     // T
  int64_t num_chunks = 0;      // C
  int64_t chunk_elements = 0;  // largest chunk, in elements
  int64_t total_elements = 0;  // sum of the tensors' element counts (the CPU decides on threads by it)
};

// One norm launch, every field named (fusedclip/backends/kernel_base.py, NormLaunch, fills it).
// Addresses are of 0-d tensors on the grads' device unless said otherwise; 0 means "none".
struct NormArgs {
  int64_t kind = -1;            // fusedclip::NormKind
  double p = 0.0;               // the norm order
  int64_t total_out = 0;        // total, in total_dtype
  int64_t total_dtype = -1;     // dtype code
  int64_t acc_out = 0;          // float64 accumulator
  int64_t coef_out = 0;         // float64 coefficient, or 0 (no max_norm)
  double max_norm = 0.0;        // used when coef_out is set and max_norm_ptr is 0
  int64_t max_norm_ptr = 0;     // max_norm read by the kernel, or 0
  int64_t max_norm_dtype = -1;  // its dtype code
  int64_t scale_ptr = 0;        // grad scale s (grads are read as s * grad), or 0
  int64_t scale_dtype = -1;     // its dtype code
  int64_t per_tensor_out = 0;   // [T] float64 per-tensor norms, or 0
  int64_t norm_scale_ptr = 0;   // general p: float64 norm scale M (see fusedclip.h), or 0
};

void check_tables(const Tables& t) {
  if (t.packed == 0) throw std::invalid_argument("fusedclip._C: null table address");
  if (t.num_tensors < 0 || t.num_chunks < 0 || t.chunk_elements <= 0 || t.total_elements < 0) {
    throw std::invalid_argument("fusedclip._C: negative table sizes or non-positive chunk size");
  }
  if (t.total_elements > 0 && t.num_chunks == 0) {
    throw std::invalid_argument("fusedclip._C: tables with elements but no chunks");
  }
}

void check_dtype(int64_t code, const char* what) {
  if (!valid_dtype(code)) {
    throw std::invalid_argument(std::string("fusedclip._C: ") + what + " must be a dtype code 0-3 (float32, float16, bfloat16, float64)");
  }
}

// What every norm launch must hold, whatever the device.
void check_norm_args(const NormArgs& a) {
  if (a.kind < fusedclip::kSumPow || a.kind > fusedclip::kCount) throw std::invalid_argument("fusedclip._C: unknown norm kind");
  check_dtype(a.total_dtype, "total_dtype");
  if (a.max_norm_ptr != 0) check_dtype(a.max_norm_dtype, "max_norm_dtype");
  if (a.scale_ptr != 0) check_dtype(a.scale_dtype, "scale_dtype");
  if (a.total_out == 0 || a.acc_out == 0) throw std::invalid_argument("fusedclip._C: null output address");
}

// The fields the CPU and the CUDA norm arguments share: the norm and where its results go.
template <class DeviceNormArgs>
void set_outputs(const NormArgs& a, DeviceNormArgs* args) {
  args->kind = static_cast<int>(a.kind);
  args->p = a.p;
  args->total_out = as_pointer<void>(a.total_out);
  args->total_dtype = static_cast<int>(a.total_dtype);
  args->acc_out = as_pointer<double>(a.acc_out);
  args->coef_out = as_pointer<double>(a.coef_out);
  args->per_tensor_out = as_pointer<double>(a.per_tensor_out);
}

fusedclip::cpu::PlanArgs cpu_plan(const Tables& t, int64_t threads) {
  check_tables(t);
  if (t.num_chunks >= fusedclip::cpu::WorkRanges::kMaxChunks) {
    throw std::invalid_argument("fusedclip._C: the CPU kernels take at most 2^32 - 1 chunks per call");
  }
  fusedclip::cpu::PlanArgs plan;
  plan.packed = as_pointer<const int64_t>(t.packed);
  plan.num_tensors = t.num_tensors;
  plan.num_chunks = t.num_chunks;
  plan.chunk_elements = t.chunk_elements;
  plan.total_elements = t.total_elements;
  plan.threads = threads < 1 ? 1 : static_cast<int>(threads > 1024 ? 1024 : threads);
  return plan;
}

void cpu_norm(const Tables& tables, const NormArgs& a, int64_t threads) {
  const fusedclip::cpu::PlanArgs plan = cpu_plan(tables, threads);
  check_norm_args(a);
  fusedclip::cpu::NormArgs args;
  set_outputs(a, &args);
  // on the CPU a max_norm held in a tensor is read here, before the pass
  args.max_norm = a.max_norm_ptr != 0
                      ? fusedclip::read_scalar(as_pointer<const void>(a.max_norm_ptr), static_cast<int>(a.max_norm_dtype))
                      : a.max_norm;
  args.has_scale = a.scale_ptr != 0;
  args.scale = args.has_scale ? fusedclip::read_scalar(as_pointer<const void>(a.scale_ptr), static_cast<int>(a.scale_dtype)) : 1.0;
  // general p: the float64 norm scale M (see fusedclip.h); other kinds ignore it
  args.norm_scale = 1.0;
  if (a.norm_scale_ptr != 0 && a.kind == fusedclip::kSumPow && a.p != 1.0 && a.p != 2.0) {
    args.norm_scale = fusedclip::usable_norm_scale(*as_pointer<const double>(a.norm_scale_ptr));
  }
  py::gil_scoped_release release;
  fusedclip::cpu::norm(plan, args);
}

void cpu_scale(const Tables& tables, int64_t threads, int64_t coef_ptr, int64_t coef_dtype) {
  const fusedclip::cpu::PlanArgs plan = cpu_plan(tables, threads);
  check_dtype(coef_dtype, "coef_dtype");
  if (coef_ptr == 0) throw std::invalid_argument("fusedclip._C: null coefficient address");
  const double coef = fusedclip::read_scalar(as_pointer<const void>(coef_ptr), static_cast<int>(coef_dtype));
  py::gil_scoped_release release;
  fusedclip::cpu::scale(plan, coef);
}

void cpu_clamp(const Tables& tables, int64_t threads, double clip_value) {
  const fusedclip::cpu::PlanArgs plan = cpu_plan(tables, threads);
  py::gil_scoped_release release;
  fusedclip::cpu::clamp(plan, clip_value);
}

std::vector<std::string> cpu_supported_isas() {
  int count = 0;
  const char* const* names = fusedclip::cpu::supported_isas(&count);
  return std::vector<std::string>(names, names + count);
}

#if defined(FUSEDCLIP_HAVE_CUDA)

fusedclip::cuda::PlanArgs cuda_plan(const Tables& t, int64_t device, int64_t stream) {
  check_tables(t);
  fusedclip::cuda::PlanArgs plan;
  plan.packed = as_pointer<const int64_t>(t.packed);
  plan.num_tensors = t.num_tensors;
  plan.num_chunks = t.num_chunks;
  plan.chunk_elements = t.chunk_elements;
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

void cuda_norm(const Tables& tables, int64_t device, int64_t stream, const NormArgs& a, int64_t partials,
               int64_t counters) {
  const fusedclip::cuda::PlanArgs plan = cuda_plan(tables, device, stream);
  check_norm_args(a);
  if (partials == 0 || counters == 0) throw std::invalid_argument("fusedclip._C: null workspace address");
  fusedclip::cuda::NormArgs args;
  set_outputs(a, &args);
  args.max_norm = a.max_norm;
  args.max_norm_ptr = as_pointer<const void>(a.max_norm_ptr);
  args.max_norm_dtype = static_cast<int>(a.max_norm_dtype);
  args.scale_ptr = as_pointer<const void>(a.scale_ptr);
  args.scale_dtype = static_cast<int>(a.scale_dtype);
  // general p: a 0-d float64 device tensor M (see fusedclip.h), read by the kernel; 0 for none
  args.norm_scale_ptr = as_pointer<const double>(a.norm_scale_ptr);
  args.partials = as_pointer<double>(partials);
  args.ticket = as_pointer<unsigned int>(counters);
  const char* error;
  {
    py::gil_scoped_release release;
    error = fusedclip::cuda::norm(plan, args);
  }
  raise_if(error);
}

void cuda_scale(const Tables& tables, int64_t device, int64_t stream, int64_t coef_ptr, int64_t coef_dtype) {
  const fusedclip::cuda::PlanArgs plan = cuda_plan(tables, device, stream);
  check_dtype(coef_dtype, "coef_dtype");
  if (coef_ptr == 0) throw std::invalid_argument("fusedclip._C: null coefficient address");
  const char* error;
  {
    py::gil_scoped_release release;
    error = fusedclip::cuda::scale(plan, as_pointer<const void>(coef_ptr), static_cast<int>(coef_dtype));
  }
  raise_if(error);
}

void cuda_clamp(const Tables& tables, int64_t device, int64_t stream, double clip_value) {
  const fusedclip::cuda::PlanArgs plan = cuda_plan(tables, device, stream);
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

  py::class_<Tables>(m, "Tables", "A plan's kernel tables: the packed table address and its sizes")
      .def(py::init([](int64_t packed, int64_t num_tensors, int64_t num_chunks, int64_t chunk_elements,
                       int64_t total_elements) {
             Tables t{packed, num_tensors, num_chunks, chunk_elements, total_elements};
             check_tables(t);
             return t;
           }),
           py::kw_only(), py::arg("packed"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("chunk_elements"),
           py::arg("total_elements") = 0)
      .def_readonly("packed", &Tables::packed)
      .def_readonly("num_tensors", &Tables::num_tensors)
      .def_readonly("num_chunks", &Tables::num_chunks)
      .def_readonly("chunk_elements", &Tables::chunk_elements)
      .def_readonly("total_elements", &Tables::total_elements);
  py::class_<NormArgs>(m, "NormArgs", "One norm launch: every field named; addresses of 0-d tensors, 0 for none")
      .def(py::init([](int64_t kind, double p, int64_t total_out, int64_t total_dtype, int64_t acc_out, int64_t coef_out,
                       double max_norm, int64_t max_norm_ptr, int64_t max_norm_dtype, int64_t scale_ptr,
                       int64_t scale_dtype, int64_t per_tensor_out, int64_t norm_scale_ptr) {
             NormArgs a{kind,          p,           total_out, total_dtype,    acc_out,       coef_out,      max_norm,
                        max_norm_ptr,  max_norm_dtype, scale_ptr, scale_dtype, per_tensor_out, norm_scale_ptr};
             check_norm_args(a);
             return a;
           }),
           py::kw_only(), py::arg("kind"), py::arg("p"), py::arg("total_out"), py::arg("total_dtype"),
           py::arg("acc_out"), py::arg("coef_out") = 0, py::arg("max_norm") = 0.0, py::arg("max_norm_ptr") = 0,
           py::arg("max_norm_dtype") = -1, py::arg("scale_ptr") = 0, py::arg("scale_dtype") = -1,
           py::arg("per_tensor_out") = 0, py::arg("norm_scale_ptr") = 0)
      .def_readonly("kind", &NormArgs::kind)
      .def_readonly("p", &NormArgs::p)
      .def_readonly("total_out", &NormArgs::total_out)
      .def_readonly("total_dtype", &NormArgs::total_dtype)
      .def_readonly("acc_out", &NormArgs::acc_out)
      .def_readonly("coef_out", &NormArgs::coef_out)
      .def_readonly("max_norm", &NormArgs::max_norm)
      .def_readonly("max_norm_ptr", &NormArgs::max_norm_ptr)
      .def_readonly("max_norm_dtype", &NormArgs::max_norm_dtype)
      .def_readonly("scale_ptr", &NormArgs::scale_ptr)
      .def_readonly("scale_dtype", &NormArgs::scale_dtype)
      .def_readonly("per_tensor_out", &NormArgs::per_tensor_out)
      .def_readonly("norm_scale_ptr", &NormArgs::norm_scale_ptr);

  m.def("cpu_norm", &cpu_norm, "Total norm (and coefficient, per-tensor norms) of a plan's CPU tensors",
        py::arg("tables"), py::arg("args"), py::arg("threads"));
  m.def("cpu_scale", &cpu_scale, "Multiply a plan's CPU tensors by the coefficient at coef_ptr (nothing when it is 1)",
        py::arg("tables"), py::arg("threads"), py::arg("coef_ptr"), py::arg("coef_dtype"));
  m.def("cpu_clamp", &cpu_clamp, "Clamp a plan's CPU tensors to [-clip_value, clip_value]", py::arg("tables"),
        py::arg("threads"), py::arg("clip_value"));
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
  m.def("cpu_parallel_runtime", [] { return std::string(fusedclip::cpu::parallel_runtime()); },
        "Where the CPU passes run their threads: the loaded OpenMP runtime's path (torch's) or 'pool'");
  m.def("cpu_isa", [] { return std::string(fusedclip::cpu::active_kernels().isa); },
        "The instruction set of the CPU loops in use");


  // Hooks for fusedclip's own tests, kept out of the module's API: pass counters, how a pass shares
  // chunks out, and a process-wide switch of the CPU loops' instruction set.
  py::module_ testing = m.def_submodule("testing", "Test hooks: pass counters, work sharing, instruction-set selection");
  testing.def(
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
  testing.def(
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
  testing.def("cpu_select_isa", [](const std::string& name) { return fusedclip::cpu::select_isa(name.c_str()); },
        "Use the CPU loops compiled for `name` (one of build_info()['cpu_isas_supported']); False if unsupported",
        py::arg("name"));

#if defined(FUSEDCLIP_HAVE_CUDA)
  m.def("cuda_device_count", &cuda_device_count, "(devices visible to the CUDA runtime, error message or None)");
  m.def("cuda_norm_units", &cuda_norm_units, "Float64 slots of the norm workspace for a plan on a device",
        py::arg("device"), py::arg("num_chunks"), py::arg("chunk_elements"));
  m.def("cuda_norm", &cuda_norm, "One launch: total norm, coefficient, per-tensor norms of a plan's CUDA tensors",
        py::arg("tables"), py::arg("device"), py::arg("stream"), py::arg("args"), py::arg("partials"),
        py::arg("counters"));
  m.def("cuda_scale", &cuda_scale, "One launch: multiply by the coefficient at coef_ptr unless it is 1",
        py::arg("tables"), py::arg("device"), py::arg("stream"), py::arg("coef_ptr"), py::arg("coef_dtype"));
  m.def("cuda_clamp", &cuda_clamp, "One launch: clamp to [-clip_value, clip_value]", py::arg("tables"),
        py::arg("device"), py::arg("stream"), py::arg("clip_value"));
#endif
}
