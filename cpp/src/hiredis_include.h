// hiredis's header, the one pkg-config names, for the store and its tests.
#ifndef RAPIDLIMIT_SRC_HIREDIS_INCLUDE_H_
#define RAPIDLIMIT_SRC_HIREDIS_INCLUDE_H_

// pkg-config's Cflags name the directory that holds hiredis.h: Debian's
// 0.14 (-I/usr/include/hiredis) and upstream's 1.x install alike (1.x's
// CMake install gives only -I<prefix>/include/hiredis). <hiredis/hiredis.h>
// first would take the system's header while linking pkg-config's library
// whenever both are installed (a 1.x in its own prefix next to Debian's
// libhiredis-dev): 0.14's redisReply and redisContext are laid out
// differently, and every reply read garbage. The other spelling is for a
// .pc whose Cflags name only the include root.
#if __has_include(<hiredis.h>)
#include <hiredis.h>
#else
#include <hiredis/hiredis.h>
#endif

// CMake defines these from the version pkg-config reports: a header of
// another hiredis ahead in the include path is a build error, not replies
// read through the wrong struct layout at run time.
#if defined(RAPIDLIMIT_HIREDIS_PC_MAJOR) && defined(RAPIDLIMIT_HIREDIS_PC_MINOR)
static_assert(HIREDIS_MAJOR == RAPIDLIMIT_HIREDIS_PC_MAJOR &&
                  HIREDIS_MINOR == RAPIDLIMIT_HIREDIS_PC_MINOR,
              "the hiredis.h found is not the version pkg-config reports: "
              "a header of another hiredis comes first in the include path");
#endif

#endif  // RAPIDLIMIT_SRC_HIREDIS_INCLUDE_H_
