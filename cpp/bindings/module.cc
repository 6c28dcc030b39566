#include <pybind11/pybind11.h>

#include "handles.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m, py::mod_gil_not_used()) {
  m.doc() = "rapidlimit's native core: parser, algorithms and stores.";
  m.attr("__version__") = RAPIDLIMIT_VERSION;
  rapidlimit::bindings::BindLimit(m);
  rapidlimit::bindings::BindStorage(m);
  rapidlimit::bindings::BindLimiter(m);
  rapidlimit::bindings::BindRedis(m);
}
