// One pass over a parameter list that reads every .grad and the four facts the plan cache keys on
// (address, bytes, dtype, contiguity), by calling torch's own C getters directly, and packs the
// facts into flat byte strings (cheap to hash and compare, no Python int per value kept).
//
// In Python this is five passes (a .grad read and four getters per grad), each through the
// descriptor and method-call layers; for many small tensors that per-grad overhead, not the
// kernels, is most of a call. The getters are torch's (handed over from Python as descriptors), so
// the values are exactly what Python would read; no torch headers are needed.
#pragma once

#include <Python.h>

namespace fusedclip {

// params: a list; plain_types: a tuple of the types that may be read this way (torch.Tensor,
// torch.nn.Parameter); descriptors: (grad, data_ptr, nbytes, dtype, is_contiguous) as found on
// torch.Tensor. Returns a new reference to (grads, key, null_address): grads the list of non-None
// .grad values; key four bytes objects, one value per grad in native byte order: address (int64),
// bytes (int64), dtype (int64: the address of the dtype object, an immortal singleton) and
// contiguity (one byte, 0 or 1); null_address whether any address is 0. Or None when the fast path does not apply (a type outside plain_types, an
// unexpected descriptor, a getter that raised: the caller then takes the Python path, which raises
// the proper error). NULL only when out of memory.
PyObject* gather_grads(PyObject* params, PyObject* plain_types, PyObject* descriptors);

}  // namespace fusedclip
