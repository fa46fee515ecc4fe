#include "nuq/quantize.hpp"
