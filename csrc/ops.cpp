// Declares every fastalign operator (schemas.h). Device implementations register themselves in
// cpu/*.cpp and cuda/*.cu; fake (meta) kernels and autograd are registered from Python
// (fastalign/ops/*.py), following PyTorch's extension-cpp layout.
#include <Python.h>
#include <torch/library.h>

#include "schemas.h"

// Importing fastalign._C from Python runs the static TORCH_LIBRARY registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastalign, m) {
  using namespace fastalign::schemas;
  for (const char* schema :
       {kRegionWordForward, kRegionWordBackward, kDimensionCorrelationLossForward,
        kSparseSpatialLossForward, kPrototypeAssignForward, kPrototypeAssignBackward,
        kPrototypeUpdate, kPrototypeTopkMixForward, kPrototypeTopkMixBackward}) {
    m.def(schema);
  }
}
