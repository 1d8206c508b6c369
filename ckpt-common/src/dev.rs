//! Device numbers: one type for a filesystem's device, as the kernel keeps it and as
//! images, JSON and tables show it ("major:minor").

use core::fmt;

/// A device number as the kernel keeps it inside (`s_dev`, and what tracepoints and
/// /proc/locks show): `major << 20 | minor`. Written "major:minor" (decimal).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelDev(pub u32);

impl KernelDev {
    pub const fn new(major: u32, minor: u32) -> KernelDev {
        KernelDev((major << 20) | (minor & 0xfffff))
    }

    pub const fn major(self) -> u32 {
        self.0 >> 20
    }

    pub const fn minor(self) -> u32 {
        self.0 & 0xfffff
    }

    /// From a userspace `st_dev` (glibc's encoding, as its `major()`/`minor()` macros
    /// undo it; written out here because this crate has no libc).
    pub const fn from_st_dev(dev: u64) -> KernelDev {
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        KernelDev::new(major as u32, minor as u32)
    }

    /// "major:minor" in decimal; None for anything else.
    pub fn parse(s: &str) -> Option<KernelDev> {
        let (major, minor) = s.split_once(':')?;
        let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
        (major < 1 << 12 && minor < 1 << 20).then(|| KernelDev::new(major, minor))
    }
}

impl fmt::Display for KernelDev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major(), self.minor())
    }
}

/// Written as "major:minor", as images always had it.
#[cfg(feature = "user")]
mod serde_impl {
    use core::fmt::Write as _;

    use super::KernelDev;

    /// Room for "4095:1048575" (no allocator here).
    struct Buf([u8; 16], usize);

    impl core::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.1 + s.len();
            self.0
                .get_mut(self.1..end)
                .ok_or(core::fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }

    impl serde::Serialize for KernelDev {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut b = Buf([0; 16], 0);
            write!(b, "{self}").map_err(serde::ser::Error::custom)?;
            s.serialize_str(core::str::from_utf8(&b.0[..b.1]).map_err(serde::ser::Error::custom)?)
        }
    }

    impl<'de> serde::Deserialize<'de> for KernelDev {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KernelDev, D::Error> {
            crate::serde_str::deserialize(d, "a device as \"major:minor\"", KernelDev::parse)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_round_trips_through_st_dev_and_its_text() {
        // glibc makedev(259, 3) and makedev(8, 1).
        assert_eq!(KernelDev::from_st_dev(0x10303), KernelDev::new(259, 3));
        assert_eq!(KernelDev::from_st_dev(0x801), KernelDev::new(8, 1));
        // makedev(0, 300): a minor above 255 keeps its high bits from bit 20 up.
        assert_eq!(KernelDev::from_st_dev(0x10002c), KernelDev::new(0, 300));
        let d = KernelDev::new(259, 3);
        assert_eq!((d.major(), d.minor()), (259, 3));
        assert_eq!(KernelDev::parse("259:3"), Some(d));
        for bad in [
            "",
            "8",
            "8:",
            ":1",
            "8:1:2",
            "x:1",
            "4096:0",
            "0:1048576",
            "-1:0",
        ] {
            assert_eq!(KernelDev::parse(bad), None, "{bad:?}");
        }
    }
}
