/* A PJRT plugin entry point with no functions, for importing torch-tpu where no TPU and no libtpu are.
 *
 * torch-tpu's C++ extensions register the TPU PJRT plugin when they load, from the library named in
 * $TPU_LIBRARY_PATH (libtpu sets it), and abort the interpreter when it is unset. This library lets
 * that registration succeed and nothing else: it reports PJRT API version 0.0, below the minimum the
 * framework accepts (0.29 in torch-tpu 0.2.0), so any attempt to start a TPU runtime through it
 * fails with "failed to initialize the PjRt plugin" before a single plugin function is called.
 * Only .ci/tpu-env.sh builds it, into the venv of the tests that import torch-tpu on a CPU.
 */
#include <stddef.h>

/* The head of PJRT_Api (xla/pjrt/c/pjrt_c_api.h): struct_size, extension_start, then
 * pjrt_api_version {struct_size, extension_start, major, minor}; every function pointer after it
 * stays NULL. The buffer is larger than any PJRT_Api. */
static size_t api[1024];

const void *GetPjrtApi(void) {
  api[0] = sizeof(api);
  api[1] = 0;
  api[2] = 2 * sizeof(size_t) + 2 * sizeof(int);
  api[3] = 0;
  api[4] = 0; /* major = 0, minor = 0 */
  return api;
}
