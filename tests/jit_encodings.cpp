// The CSR JIT's x86 encoder (csrc/cpu/jit_x86.h) as a filter: encoder calls in (one per line:
// name and integer operands, tests/test_csr_jit.py writes them), the bytes of the whole sequence
// out (hex), to be compared with what GNU as makes of the same instructions.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include "jit_x86.h"
using namespace pysparse::cpu::jit;
int main() {
  X86 a;
  std::string line;
  std::vector<size_t> labels;
  while (std::getline(std::cin, line)) {
    std::istringstream s(line);
    std::string op;
    long x = 0, y = 0, z = 0;
    s >> op >> x >> y >> z;
    if (op == "label") labels.push_back(a.size());
    else if (op == "vzero") a.vzero(int(x));
    else if (op == "vload") a.vload(int(x), Gpr(y), int32_t(z));
    else if (op == "vstore") a.vstore(Gpr(x), int32_t(y), int(z));
    else if (op == "vfmadd") { long w; s >> w; a.vfmadd_bcast(int(x), int(y), Gpr(z), int32_t(w)); }
    else if (op == "mov") a.mov(Gpr(x), Gpr(y));
    else if (op == "lea") a.lea(Gpr(x), Gpr(y), int32_t(z));
    else if (op == "add") a.add(Gpr(x), int32_t(y));
    else if (op == "xor") a.xor_(Gpr(x), Gpr(y));
    else if (op == "cmp") a.cmp(Gpr(x), Gpr(y));
    else if (op == "jb") a.jb_back(labels.at(size_t(x)));
    else if (op == "vzeroupper") a.vzeroupper();
    else if (op == "ret") a.ret();
    else { std::fprintf(stderr, "bad op %s\n", op.c_str()); return 2; }
  }
  for (uint8_t b : a.code) std::printf("%02x", b);
  std::printf("\n");
}
