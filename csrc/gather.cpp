#include "gather.h"

#include <cstdint>
#include <cstring>

namespace fusedclip {
namespace {

struct Getters {
  getter grad, nbytes, dtype;
  void *grad_closure, *nbytes_closure, *dtype_closure;
  PyCFunction data_ptr;                    // METH_NOARGS
  PyCFunctionWithKeywords is_contiguous;  // METH_VARARGS | METH_KEYWORDS
};

bool getset_of(PyObject* descriptor, getter* get, void** closure) {
  if (!PyObject_TypeCheck(descriptor, &PyGetSetDescr_Type)) return false;
  PyGetSetDef* def = reinterpret_cast<PyGetSetDescrObject*>(descriptor)->d_getset;
  if (def == nullptr || def->get == nullptr) return false;
  *get = def->get;
  *closure = def->closure;
  return true;
}

PyMethodDef* method_of(PyObject* descriptor, int flags) {
  if (!PyObject_TypeCheck(descriptor, &PyMethodDescr_Type)) return nullptr;
  PyMethodDef* def = reinterpret_cast<PyMethodDescrObject*>(descriptor)->d_method;
  return (def != nullptr && def->ml_flags == flags) ? def : nullptr;
}

bool getters_from(PyObject* descriptors, Getters* g) {
  if (!PyTuple_Check(descriptors) || PyTuple_GET_SIZE(descriptors) != 5) return false;
  PyMethodDef* data_ptr = method_of(PyTuple_GET_ITEM(descriptors, 1), METH_NOARGS);
  PyMethodDef* contiguous = method_of(PyTuple_GET_ITEM(descriptors, 4), METH_VARARGS | METH_KEYWORDS);
  if (data_ptr == nullptr || contiguous == nullptr) return false;
  g->data_ptr = data_ptr->ml_meth;
  g->is_contiguous = reinterpret_cast<PyCFunctionWithKeywords>(reinterpret_cast<void (*)(void)>(contiguous->ml_meth));
  return getset_of(PyTuple_GET_ITEM(descriptors, 0), &g->grad, &g->grad_closure) &&
         getset_of(PyTuple_GET_ITEM(descriptors, 2), &g->nbytes, &g->nbytes_closure) &&
         getset_of(PyTuple_GET_ITEM(descriptors, 3), &g->dtype, &g->dtype_closure);
}

bool is_plain(PyObject* object, PyObject* plain_types) {
  PyTypeObject* type = Py_TYPE(object);
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(plain_types); ++i) {
    if (reinterpret_cast<PyObject*>(type) == PyTuple_GET_ITEM(plain_types, i)) return true;
  }
  return false;
}

// Owns a new reference.
struct Ref {
  PyObject* p = nullptr;
  Ref() = default;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
};

PyObject* none() { Py_RETURN_NONE; }

}  // namespace

PyObject* gather_grads(PyObject* params, PyObject* plain_types, PyObject* descriptors) {
  Getters g;
  if (!PyList_Check(params) || !PyTuple_Check(plain_types) || !getters_from(descriptors, &g)) return none();
  const Py_ssize_t n = PyList_GET_SIZE(params);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!is_plain(PyList_GET_ITEM(params, i), plain_types)) return none();
  }
  Ref grads(PyList_New(0));
  Ref empty_args(PyTuple_New(0));
  if (grads.p == nullptr || empty_args.p == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Ref grad(g.grad(PyList_GET_ITEM(params, i), g.grad_closure));
    if (grad.p == nullptr) {
      PyErr_Clear();
      return none();
    }
    if (grad.p == Py_None) continue;
    if (!is_plain(grad.p, plain_types)) return none();
    if (PyList_Append(grads.p, grad.p) != 0) return nullptr;
  }
  const Py_ssize_t m = PyList_GET_SIZE(grads.p);
  const Py_ssize_t words = m * static_cast<Py_ssize_t>(sizeof(int64_t));
  Ref addresses(PyBytes_FromStringAndSize(nullptr, words)), nbytes(PyBytes_FromStringAndSize(nullptr, words));
  Ref dtypes(PyBytes_FromStringAndSize(nullptr, words)), contiguous(PyBytes_FromStringAndSize(nullptr, m));
  if (!addresses.p || !nbytes.p || !dtypes.p || !contiguous.p) return nullptr;
  char* address_out = PyBytes_AS_STRING(addresses.p);
  char* nbytes_out = PyBytes_AS_STRING(nbytes.p);
  char* dtype_out = PyBytes_AS_STRING(dtypes.p);
  char* contiguous_out = PyBytes_AS_STRING(contiguous.p);
  bool null_address = false;
  for (Py_ssize_t i = 0; i < m; ++i) {
    PyObject* grad = PyList_GET_ITEM(grads.p, i);
    // one getter at a time: none may run with an exception pending
    Ref address(g.data_ptr(grad, nullptr));
    Ref bytes(address.p ? g.nbytes(grad, g.nbytes_closure) : nullptr);
    Ref dtype(bytes.p ? g.dtype(grad, g.dtype_closure) : nullptr);
    Ref dense(dtype.p ? g.is_contiguous(grad, empty_args.p, nullptr) : nullptr);
    if (dense.p == nullptr || !PyBool_Check(dense.p)) {  // e.g. no storage: the Python path knows what to do
      PyErr_Clear();
      return none();
    }
    const int64_t values[3] = {
        static_cast<int64_t>(reinterpret_cast<uintptr_t>(PyLong_AsVoidPtr(address.p))),
        static_cast<int64_t>(PyLong_AsLongLong(bytes.p)),
        // dtype objects are immortal singletons: the object's address identifies the dtype
        static_cast<int64_t>(reinterpret_cast<uintptr_t>(dtype.p)),
    };
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return none();
    }
    std::memcpy(address_out + i * sizeof(int64_t), &values[0], sizeof(int64_t));
    std::memcpy(nbytes_out + i * sizeof(int64_t), &values[1], sizeof(int64_t));
    std::memcpy(dtype_out + i * sizeof(int64_t), &values[2], sizeof(int64_t));
    contiguous_out[i] = dense.p == Py_True ? 1 : 0;
    null_address |= values[0] == 0;
  }
  Ref key(PyTuple_Pack(4, addresses.p, nbytes.p, dtypes.p, contiguous.p));
  if (key.p == nullptr) return nullptr;
  return PyTuple_Pack(3, grads.p, key.p, null_address ? Py_True : Py_False);
}

}  // namespace fusedclip
