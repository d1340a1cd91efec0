; AGIPD-like test geometry: 2 modules (dim1) of 2 asics of 3 x 5 pixels
photon_energy = 9300 ; eV
clen = 0.12
adu_per_eV = 0.0075
res = 5000 ; 200 um pixels
data = /entry_1/instrument_1/detector_1/data
mask = /entry_1/instrument_1/detector_1/mask
mask_file = mask.h5
mask_good = 0x0
mask_bad = 0xffff
dim0 = %
dim2 = ss
dim3 = fs

rigid_group_q0 = p0a0,p0a1
rigid_group_collection_quadrants = q0

p0a0/dim1 = 0
p0a0/min_fs = 0
p0a0/max_fs = 4
p0a0/min_ss = 0
p0a0/max_ss = 2
p0a0/fs = +0.0021x -0.9999y
p0a0/ss = +0.9999x +0.0021y
p0a0/corner_x = -20.5
p0a0/corner_y = 12.25
p0a0/coffset = 0.0005

p0a1/dim1 = 0
p0a1/min_fs = 0
p0a1/max_fs = 4
p0a1/min_ss = 3
p0a1/max_ss = 5
p0a1/fs = +0.0021x -0.9999y
p0a1/ss = +0.9999x +0.0021y
p0a1/corner_x = -16.9
p0a1/corner_y = 12.26
p0a1/coffset = 0.0005

p1a0/dim1 = 1
p1a0/min_fs = 0
p1a0/max_fs = 4
p1a0/min_ss = 0
p1a0/max_ss = 2
p1a0/fs = -0.0021x +0.9999y
p1a0/ss = -0.9999x -0.0021y +0.05z
p1a0/corner_x = 19.75
p1a0/corner_y = -11.5
p1a0/coffset = 0.001

p1a1/dim1 = 1
p1a1/min_fs = 0
p1a1/max_fs = 4
p1a1/min_ss = 3
p1a1/max_ss = 5
p1a1/fs = -0.0021x +0.9999y
p1a1/ss = -0.9999x -0.0021y
p1a1/corner_x = 16.1
p1a1/corner_y = -11.52
p1a1/coffset = 0.001
p1a1/no_index = 1

; a lab-frame box and a panel region
badbox/min_x = -20.0
badbox/max_x = -18.5
badbox/min_y = 10.0
badbox/max_y = 13.0

badasic/min_fs = 3
badasic/max_fs = 4
badasic/min_ss = 1
badasic/max_ss = 1
badasic/panel = p1a0
