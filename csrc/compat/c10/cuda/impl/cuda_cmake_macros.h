// Fallback for compile checks against a CPU-only torch wheel, which ships the
// c10/cuda headers but not this generated one. Included with -idirafter, so a
// CUDA build of torch always uses its own copy. Same content as torch's.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
