// A minimal x86-64 encoder for the pattern-specific CSR code (csr_jit.cpp): the dozen
// instruction forms that code uses and no more. Written here rather than taken from a JIT
// assembler library (xbyak, asmjit): none is on the package indexes this project builds from, and
// these forms fit in a page. Encodings are checked byte for byte against GNU as
// (tests/test_csr_jit.py), which picks the same shortest forms (disp8, compressed disp8*N, imm8).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace pysparse {
namespace cpu {
namespace jit {

enum Gpr : int { rax = 0, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15 };

class X86 {
 public:
  std::vector<uint8_t> code;

  size_t size() const { return code.size(); }

  // vpxord zmm d, zmm d, zmm d (zero d)
  void vzero(int d) { evex_rr(0x01, 0x1, d, d, d, 0xEF); }
  // vmovups zmm d, [base + disp]
  void vload(int d, Gpr base, int32_t disp) { evex_rm(0x01, 0x0, d, -1, base, disp, false, 64, 0x10); }
  // vmovups [base + disp], zmm s
  void vstore(Gpr base, int32_t disp, int s) { evex_rm(0x01, 0x0, s, -1, base, disp, false, 64, 0x11); }
  // vfmadd231ps zmm d, zmm a, dword [base + disp]{1to16}: d += a * broadcast(mem)
  void vfmadd_bcast(int d, int a, Gpr base, int32_t disp) { evex_rm(0x02, 0x1, d, a, base, disp, true, 4, 0xB8); }

  void mov(Gpr d, Gpr s) { rex_w(s, d), byte(0x89), modrm(3, s, d); }
  void lea(Gpr d, Gpr base, int32_t disp) { rex_w(d, base), byte(0x8D), mem(d, base, disp, 1); }
  void add(Gpr d, int32_t imm) {
    rex_w(0, d);
    if (fits8(imm)) byte(0x83), modrm(3, 0, d), byte(uint8_t(imm));
    else if (d == rax) byte(0x05), u32(uint32_t(imm));  // the accumulator's short form, as GNU as picks
    else byte(0x81), modrm(3, 0, d), u32(uint32_t(imm));
  }
  void xor_(Gpr d, Gpr s) { rex_w(s, d), byte(0x31), modrm(3, s, d); }
  void cmp(Gpr a, Gpr b) { rex_w(b, a), byte(0x39), modrm(3, b, a); }  // flags of a - b
  // jb to an earlier position (unsigned a < b after cmp(a, b))
  void jb_back(size_t target) {
    const int64_t rel8 = int64_t(target) - int64_t(code.size() + 2);
    if (fits8(rel8)) return byte(0x72), byte(uint8_t(int8_t(rel8)));
    const int64_t rel32 = int64_t(target) - int64_t(code.size() + 6);
    byte(0x0F), byte(0x82), u32(uint32_t(int32_t(rel32)));
  }
  void vzeroupper() { byte(0xC5), byte(0xF8), byte(0x77); }
  void ret() { byte(0xC3); }

  static bool fits8(int64_t v) { return v >= -128 && v <= 127; }

 private:
  void byte(uint8_t b) { code.push_back(b); }
  void u32(uint32_t v) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    code.insert(code.end(), b, b + 4);
  }
  void modrm(int mod, int reg, int rm) { byte(uint8_t((mod << 6) | ((reg & 7) << 3) | (rm & 7))); }
  void rex_w(int reg, int rm) { byte(uint8_t(0x48 | ((reg >> 3) & 1) << 2 | ((rm >> 3) & 1))); }
  // [base + disp], base not rsp/r12 (they need a SIB byte; the generated code never uses them);
  // rbp/r13 have no form without a displacement. N: disp8 scale (EVEX compressed displacement;
  // 1 for legacy instructions).
  void mem(int reg, Gpr base, int32_t disp, int N) {
    if (disp == 0 && (base & 7) != 5) modrm(0, reg, base);
    else if (disp % N == 0 && fits8(disp / N)) modrm(1, reg, base), byte(uint8_t(int8_t(disp / N)));
    else modrm(2, reg, base), u32(uint32_t(disp));
  }
  // EVEX prefix for a 512-bit op: reg (ModRM.reg, 5 bits), v (vvvv, 5 bits, -1: none),
  // rm_hi: bits 3-4 of a register operand in ModRM.rm (B and X), or of a base register (B).
  void evex(int mm, int pp, int reg, int v, int rm, bool rm_is_vec, bool bcast) {
    const int vv = v < 0 ? 0 : v;
    byte(0x62);
    byte(uint8_t((((reg >> 3) & 1) ^ 1) << 7 | ((rm_is_vec ? ((rm >> 4) & 1) : 0) ^ 1) << 6 |
                 (((rm >> 3) & 1) ^ 1) << 5 | (((reg >> 4) & 1) ^ 1) << 4 | mm));
    byte(uint8_t(0 << 7 | ((~vv) & 15) << 3 | 1 << 2 | pp));  // W0
    byte(uint8_t(2 << 5 | (bcast ? 1 : 0) << 4 | (((vv >> 4) & 1) ^ 1) << 3));  // L'L = 512
  }
  void evex_rr(int mm, int pp, int d, int a, int b, uint8_t op) {
    evex(mm, pp, d, a, b, true, false), byte(op), modrm(3, d, b);
  }
  void evex_rm(int mm, int pp, int reg, int v, Gpr base, int32_t disp, bool bcast, int N, uint8_t op) {
    evex(mm, pp, reg, v, base, false, bcast), byte(op), mem(reg, base, disp, N);
  }
};

}  // namespace jit
}  // namespace cpu
}  // namespace pysparse
