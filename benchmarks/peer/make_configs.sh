#!/usr/bin/env bash
# Create Dragonfly run folders + config.ini for the two benchmark data sets.
# Usage: make_configs.sh [PEER_ROOT=/work/peer] [NUM_DATA=20000]
set -euo pipefail
PEER=${1:-/work/peer}
NUM=${2:-20000}
DF=$PEER/Dragonfly
mk() {  # name pdb detd_mm lambda_A mean_count num_data
  local name=$1 pdb=$2 detd=$3 lam=$4 mc=$5 nd=$6
  local d=$PEER/runs/$name
  mkdir -p "$d/data" "$d/output" "$d/logs"
  ln -sfn "$DF/aux" "$d/aux"
  cat > "$d/config.ini" <<CFG
[parameters]
detd = $detd
lambda = $lam
detsize = 64
pixsize = 0.48
stoprad = 3
polarization = x

[make_densities]
in_pdb_file = $pdb
scatt_dir = aux/
out_density_file = data/densityMap.bin
num_threads = 1

[make_intensities]
in_density_file = make_densities:::out_density_file
out_intensity_file = data/intensities.bin
num_threads = 1

[make_detector]
out_detector_file = data/det_sim.h5

[make_data]
num_data = $nd
mean_count = $mc
in_detector_file = make_detector:::out_detector_file
in_intensity_file = make_intensities:::out_intensity_file
out_photons_file = data/photons.emc

[emc]
in_photons_file = make_data:::out_photons_file
in_detector_file = make_detector:::out_detector_file
num_div = 4
output_folder = output/
log_file = logs/EMC.log
need_scaling = 0
beta_factor = 1.0
beta_schedule = 2.0 10
CFG
  echo "$d/config.ini"
}
# ~190 A particle: TMV coat-protein disk 1EI7 (BIOMT assembly applied by Dragonfly's make_densities, 194.7 A max extent)
mk tmv190 "$(cd "$(dirname "$0")/../.." && pwd)/bayes_spi/resources/1EI7.pdb" 200 2.0 1000 "$NUM"
# ~55-68 A particle 2CEX, detector at 75 mm so q at the detector edge (centre of edge) ~0.10 1/A
mk 2cex "$(cd "$(dirname "$0")/../.." && pwd)/bayes_spi/resources/2CEX.pdb" 75 2.0 3000 "$NUM"
