// header_check.cpp: the header compiles as C++ (-Wall -Wextra -Werror
// -pedantic) and agrees with the library it links.
#include "pipeswitch.h"

#include <cstdio>
#include <cstring>

int main() {
  if (ps_version_number() != PS_VERSION_NUMBER) {
    std::fprintf(stderr, "version mismatch\n");
    return 1;
  }
  ps_store *store = nullptr;
  ps_status st = ps_store_open(nullptr, &store);
  if (st != PS_ERR_NULL_ARGUMENT || store != nullptr ||
      std::strstr(ps_last_error_message(), "ps_store_open") == nullptr) {
    std::fprintf(stderr, "NULL name not reported: %u\n", static_cast<unsigned>(st));
    return 1;
  }
  if (ps_store_free(nullptr) != PS_OK) {
    return 1;
  }
  std::printf("C++ OK: %s\n", ps_version_string());
  return 0;
}
