"""Intel 82540EM register map, bit definitions and descriptor layouts.

Offsets and bit positions are those of Intel's 8254x family software developer's manual,
as used by the Linux ``e1000`` driver; values checked against the register traffic of
``shared/interop/qemu-e1000-remote.jsonl`` where the trace shows them.
"""

from __future__ import annotations

import struct

# --- identity ----------------------------------------------------------------------------
VENDOR_ID = 0x8086
DEVICE_ID = 0x100E  # 82540EM
SUBSYSTEM_VENDOR_ID = 0x1AF4  # what QEMU's model reports (trace: cfg+0x2c = 0x11001af4)
SUBSYSTEM_ID = 0x1100
REVISION = 0x03
CLASS_CODE = 0x020000  # network controller, Ethernet

BAR0_SIZE = 0x20000  # 128 KiB of MMIO registers
BAR1_SIZE = 0x40  # I/O: IOADDR / IODATA
IOADDR = 0x00
IODATA = 0x04

# --- general registers -------------------------------------------------------------------
CTRL = 0x0000
STATUS = 0x0008
EECD = 0x0010
EERD = 0x0014
CTRL_EXT = 0x0018
FLA = 0x001C
MDIC = 0x0020
FCAL = 0x0028
FCAH = 0x002C
FCT = 0x0030
VET = 0x0038
ICR = 0x00C0
ITR = 0x00C4
ICS = 0x00C8
IMS = 0x00D0
IMC = 0x00D8
RCTL = 0x0100
FCTTV = 0x0170
TXCW = 0x0178
RXCW = 0x0180
TCTL = 0x0400
TIPG = 0x0410
AIT = 0x0458
LEDCTL = 0x0E00
PBA = 0x1000
FCRTL = 0x2160
FCRTH = 0x2168
RDFH = 0x2410
RDFT = 0x2418
RDFHS = 0x2420
RDFTS = 0x2428
RDFPC = 0x2430
RDBAL = 0x2800
RDBAH = 0x2804
RDLEN = 0x2808
RDH = 0x2810
RDT = 0x2818
RDTR = 0x2820
RXDCTL = 0x2828
RADV = 0x282C
RSRPD = 0x2C00
TXDMAC = 0x3000
TDFH = 0x3410
TDFT = 0x3418
TDFHS = 0x3420
TDFTS = 0x3428
TDFPC = 0x3430
TDBAL = 0x3800
TDBAH = 0x3804
TDLEN = 0x3808
TDH = 0x3810
TDT = 0x3818
TIDV = 0x3820
TXDCTL = 0x3828
TADV = 0x382C
TSPMT = 0x3830
RXCSUM = 0x5000
MTA = 0x5200  # 128 dwords
MTA_COUNT = 128
RA = 0x5400  # 16 (RAL, RAH) pairs
RA_COUNT = 16
VFTA = 0x5600  # 128 dwords
VFTA_COUNT = 128
WUC = 0x5800
WUFC = 0x5808
WUS = 0x5810
MANC = 0x5820
IPAV = 0x5838
IP4AT = 0x5840  # 4 entries, 8 bytes apart
IP6AT = 0x5880  # 4 dwords
WUPL = 0x5900
WUPM = 0x5A00  # 32 dwords
FFLT = 0x5F00  # 4 entries, 8 bytes apart

# --- statistics (0x4000-0x40FC, read-to-clear) ----------------------------------------------
STATS_BASE = 0x4000
STATS_END = 0x4100
CRCERRS = 0x4000
ALGNERRC = 0x4004
SYMERRS = 0x4008
RXERRC = 0x400C
MPC = 0x4010
SCC = 0x4014
ECOL = 0x4018
MCC = 0x401C
LATECOL = 0x4020
COLC = 0x4028
DC = 0x4030
TNCRS = 0x4034
SEC = 0x4038
CEXTERR = 0x403C
RLEC = 0x4040
XONRXC = 0x4048
XONTXC = 0x404C
XOFFRXC = 0x4050
XOFFTXC = 0x4054
FCRUC = 0x4058
PRC64 = 0x405C
PRC127 = 0x4060
PRC255 = 0x4064
PRC511 = 0x4068
PRC1023 = 0x406C
PRC1522 = 0x4070
GPRC = 0x4074
BPRC = 0x4078
MPRC = 0x407C
GPTC = 0x4080
GORCL = 0x4088
GORCH = 0x408C
GOTCL = 0x4090
GOTCH = 0x4094
RNBC = 0x40A0
RUC = 0x40A4
RFC = 0x40A8
ROC = 0x40AC
RJC = 0x40B0
MGTPRC = 0x40B4
MGTPDC = 0x40B8
MGTPTC = 0x40BC
TORL = 0x40C0
TORH = 0x40C4
TOTL = 0x40C8
TOTH = 0x40CC
TPR = 0x40D0
TPT = 0x40D4
PTC64 = 0x40D8
PTC127 = 0x40DC
PTC255 = 0x40E0
PTC511 = 0x40E4
PTC1023 = 0x40E8
PTC1522 = 0x40EC
MPTC = 0x40F0
BPTC = 0x40F4
TSCTC = 0x40F8
TSCTFC = 0x40FC
#: Statistics kept as 64-bit counters in a (low, high) register pair: reading the high
#: half clears both halves.
STATS_PAIRS = {GORCH: GORCL, GOTCH: GOTCL, TORH: TORL, TOTH: TOTL}
STATS_LOW_OF_PAIR = {low: high for high, low in STATS_PAIRS.items()}
#: Offsets in 0x4000-0x40FC that are not counters (reserved: read 0, writes ignored).
STATS_RESERVED = frozenset({0x4024, 0x402C, 0x4044, 0x4084, 0x4098, 0x409C})
STATS_OFFSETS = tuple(off for off in range(STATS_BASE, STATS_END, 4) if off not in STATS_RESERVED)
RX_SIZE_BUCKETS = (PRC64, PRC127, PRC255, PRC511, PRC1023, PRC1522)
TX_SIZE_BUCKETS = (PTC64, PTC127, PTC255, PTC511, PTC1023, PTC1522)

# --- CTRL --------------------------------------------------------------------------------
CTRL_FD = 1 << 0
CTRL_SLU = 1 << 6
CTRL_SPD_1000 = 1 << 9
CTRL_SWDPIN0 = 1 << 18
CTRL_SWDPIN2 = 1 << 20
CTRL_RST = 1 << 26
CTRL_VME = 1 << 30
CTRL_PHY_RST = 1 << 31
CTRL_RESET_VALUE = CTRL_SWDPIN2 | CTRL_SWDPIN0 | CTRL_SPD_1000 | CTRL_SLU  # 0x00140240

# --- STATUS ------------------------------------------------------------------------------
STATUS_FD = 1 << 0
STATUS_LU = 1 << 1
STATUS_SPEED_1000 = 1 << 7
STATUS_ASDV = 0x300
STATUS_MTXCKOK = 1 << 10
STATUS_GIO_MASTER_EN = 1 << 19
STATUS_RESERVED_31 = 1 << 31
#: 0x80080783 with the link up, as QEMU's model and the trace show.
STATUS_BASE = (
    STATUS_RESERVED_31
    | STATUS_GIO_MASTER_EN
    | STATUS_MTXCKOK
    | STATUS_ASDV
    | STATUS_SPEED_1000
    | STATUS_FD
)

# --- EECD / EERD -------------------------------------------------------------------------
EECD_SK = 1 << 0
EECD_CS = 1 << 1
EECD_DI = 1 << 2
EECD_DO = 1 << 3
EECD_FWE = 0x30
EECD_REQ = 1 << 6
EECD_GNT = 1 << 7
EECD_PRES = 1 << 8
#: Bits the driver drives (and reads back as written).
EECD_DRIVEN = EECD_SK | EECD_CS | EECD_DI | EECD_FWE | EECD_REQ
EERD_START = 1 << 0
EERD_DONE = 1 << 4
EERD_ADDR_SHIFT = 8
EERD_DATA_SHIFT = 16

# --- MDIC --------------------------------------------------------------------------------
MDIC_DATA = 0xFFFF
MDIC_REG_SHIFT = 16
MDIC_PHY_SHIFT = 21
MDIC_OP_WRITE = 1 << 26
MDIC_OP_READ = 2 << 26
MDIC_READY = 1 << 28
MDIC_INT_EN = 1 << 29
MDIC_ERROR = 1 << 30

# --- interrupt causes (ICR / ICS / IMS / IMC) ---------------------------------------------
ICR_TXDW = 1 << 0
ICR_TXQE = 1 << 1
ICR_LSC = 1 << 2
ICR_RXSEQ = 1 << 3
ICR_RXDMT0 = 1 << 4
ICR_RXO = 1 << 6
ICR_RXT0 = 1 << 7
ICR_MDAC = 1 << 9
ICR_TXD_LOW = 1 << 15
ICR_SRPD = 1 << 16
#: Cause bits ICR latches (the rest reads 0). Intel's manual lists bits 5, 8 and 11 as
#: reserved, but Linux's e1000_intr_test forces every cause 0..9 through ICS with it enabled
#: in IMS and fails (code 4) unless an interrupt with that bit in ICR follows, so the part
#: latches them: bits 0-16 (TXD_LOW 15 and SRPD 16 are the last causes the 82540 has).
ICR_VALID = 0x0001FFFF
#: What Linux's e1000 driver enables (IMS_ENABLE_MASK).
IMS_ENABLE_MASK = ICR_RXT0 | ICR_TXDW | ICR_RXDMT0 | ICR_RXSEQ | ICR_LSC

# --- RCTL --------------------------------------------------------------------------------
RCTL_EN = 1 << 1
RCTL_SBP = 1 << 2
RCTL_UPE = 1 << 3
RCTL_MPE = 1 << 4
RCTL_LPE = 1 << 5
RCTL_LBM_MASK = 0xC0  # loopback mode: 00 none, 01 MAC, 11 transceiver
RCTL_LBM_MAC = 0x40
RCTL_RDMTS_SHIFT = 8
RCTL_RDMTS_MASK = 0x300
RCTL_MO_SHIFT = 12
RCTL_MO_MASK = 0x3000
RCTL_BAM = 1 << 15
RCTL_BSIZE_SHIFT = 16
RCTL_BSIZE_MASK = 0x30000
RCTL_VFE = 1 << 18
RCTL_BSEX = 1 << 25
RCTL_SECRC = 1 << 26
#: RCTL bits the 82540 implements (EN..RDMTS, MO, BAM..CFI, DPF, PMCF, BSEX, SECRC): the
#: mask of e1000_reg_test's RCTL set-and-check.
RCTL_WRITABLE = 0x06DFB3FE

# --- TCTL --------------------------------------------------------------------------------
TCTL_EN = 1 << 1
TCTL_PSP = 1 << 3
#: EN, PSP, CT (11:4), COLD (21:12), SWXOFF, RTLC; bits 0 and 2 and 23, 25-31 reserved.
TCTL_WRITABLE = 0x017FFFFA

# --- RXCSUM ------------------------------------------------------------------------------
RXCSUM_PCSS_MASK = 0xFF
RXCSUM_IPOFL = 1 << 8
RXCSUM_TUOFL = 1 << 9

# --- RAH ---------------------------------------------------------------------------------
RAH_AV = 1 << 31

# --- interrupt delay registers -----------------------------------------------------------
DELAY_UNIT = 1.024e-6  # RDTR/RADV/TIDV/TADV count 1.024 us
ITR_UNIT = 256e-9  # ITR counts 256 ns
FPD = 1 << 31  # RDTR/TIDV: flush partial descriptor block (fire the pending interrupt)

# --- descriptors -------------------------------------------------------------------------
DESC_SIZE = 16
DESC = struct.Struct("<QII")  # buffer address, lower dword, upper dword
RX_DESC = struct.Struct("<QHHBBH")  # address, length, csum, status, errors, special
RX_WRITEBACK = struct.Struct("<HHBBH")  # the last 8 bytes of an RX descriptor

# TX command bits (legacy: byte 11; extended: bits 31:24 of the lower dword)
TXD_CMD_EOP = 0x01
TXD_CMD_IFCS = 0x02
TXD_CMD_IC = 0x04  # legacy: insert checksum
TXD_CMD_TSE = 0x04  # data descriptor: TCP segmentation enable
TXD_CMD_RS = 0x08
TXD_CMD_RPS = 0x10
TXD_CMD_DEXT = 0x20
TXD_CMD_VLE = 0x40
TXD_CMD_IDE = 0x80
TXD_DTYP_CONTEXT = 0x0
TXD_DTYP_DATA = 0x1
TXD_STAT_DD = 0x01
TXD_POPTS_IXSM = 0x01
TXD_POPTS_TXSM = 0x02
# context descriptor TUCMD (bits 31:24 of cmd_and_length)
TUCMD_TCP = 0x01
TUCMD_IP = 0x02
TUCMD_TSE = 0x04

# RX status / errors
RXD_STAT_DD = 0x01
RXD_STAT_EOP = 0x02
RXD_STAT_IXSM = 0x04
RXD_STAT_VP = 0x08
RXD_STAT_TCPCS = 0x20
RXD_STAT_IPCS = 0x40
RXD_ERR_TCPE = 0x20
RXD_ERR_IPE = 0x40

# --- reset values of plain registers (others reset to 0) -----------------------------------
MANC_RESET = 0x00222300  # EN_MNG2HOST | RCV_TCO_EN | ARP_EN | 0298_EN | RMCP_EN
PBA_RESET = 0x00100030  # 48 KiB receive, 16 KiB transmit packet buffer
LEDCTL_RESET = 0x00000602
VET_RESET = 0x8100
