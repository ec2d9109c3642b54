/*
 * A stand-in for Windows' bcryptprimitives.dll, for running uvmctl.exe and
 * its tests under Wine 8, which lacks it. Rust's standard library (1.78 and
 * later) asks it for random bytes through ProcessPrng; this answers from
 * RtlGenRandom (advapi32's SystemFunction036), which Wine has.
 *
 * Built by scripts/test-windows with mingw-w64; never shipped.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
