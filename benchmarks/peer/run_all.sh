#!/usr/bin/env bash
# Full peer benchmark: build Dragonfly, simulate with its own simulator, convert, run EMC, score.
# One core throughout (OMP_NUM_THREADS=1, make -j1, emc -t 1, no mpirun). See README.md.
set -euo pipefail
PEER=${PEER:-/work/peer}
REPO=${REPO:-/work/main}
PY=$REPO/.venv/bin/python          # bayes-spi venv (converter, scorer)
DPY=$PEER/venv/bin/python          # Dragonfly's python utilities (numpy scipy h5py six future pandas)
DF=$PEER/Dragonfly
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
ITERS=${ITERS:-12}

step=${1:-all}

if [[ $step == all || $step == build ]]; then
  # sources: a checkout of github.com/duaneloh/Dragonfly at $DF (commit a2933c3 used here)
  apt-get install -y libgsl-dev libhdf5-dev libopenmpi-dev openmpi-bin cmake
  [[ -x $DPY ]] || { python3 -m venv $PEER/venv; $PEER/venv/bin/pip install numpy scipy h5py six future pandas; }
  mkdir -p $DF/build && cd $DF/build && cmake .. -DCMAKE_BUILD_TYPE=Release && make -j1 emc make_data
fi

if [[ $step == all || $step == sim ]]; then
  $REPO/benchmarks/peer/make_configs.sh $PEER 20000
  for run in tmv190 2cex; do
    cd $PEER/runs/$run
    $DPY $DF/utils/make_densities.py -c config.ini -y -v
    $DPY $DF/utils/make_intensities.py -c config.ini -y -v
    $DPY $DF/utils/make_detector.py -c config.ini -y -v
    $DF/build/utils/make_data -c config.ini -t 1 -y
  done
fi

if [[ $step == all || $step == convert ]]; then
  mkdir -p $PEER/h5
  cd $REPO
  $PY benchmarks/peer/dragonfly_to_h5.py --config $PEER/runs/tmv190/config.ini --out $PEER/h5/tmv190_20k.h5
  $PY benchmarks/peer/dragonfly_to_h5.py --config $PEER/runs/2cex/config.ini --out $PEER/h5/2cex_20k.h5
fi

if [[ $step == all || $step == emc ]]; then
  for run in tmv190 2cex; do
    cd $PEER/runs/$run
    rm -rf output logs; mkdir -p output logs
    /usr/bin/time -v $DF/build/emc -c config.ini -t 1 $ITERS > emc_stdout.log 2> emc_time.log
  done
fi

if [[ $step == all || $step == score ]]; then
  cd $REPO
  $PY benchmarks/peer/score_emc.py --run $PEER/runs/tmv190 --truth $PEER/h5/tmv190_20k.h5 --csv $PEER/runs/tmv190/score.csv
  $PY benchmarks/peer/score_emc.py --run $PEER/runs/2cex --truth $PEER/h5/2cex_20k.h5 --csv $PEER/runs/2cex/score.csv
fi
