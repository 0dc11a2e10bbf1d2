#!/bin/sh
# Real programs for the offload fidelity suite: sh fidelity_programs.sh BASE
#
# Each section runs in BASE/NAME and leaves its files there, its output (stdout and stderr)
# in BASE/NAME/output and its exit status in BASE/NAME/status. The test runs this script
# natively and as the child of `mckmpi run --mode lwk` and compares BASE/NAME byte for byte.
# Times are fixed wherever a program records them (archives, commits), so the two runs
# can only differ where the offload does.
base=$1
export LC_ALL=C TZ=UTC
STAMP=@1700000000
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3

section() {
  name=$1
  shift
  mkdir -p "$base/$name"
  ( cd "$base/$name" && set -e && "$@" ) > "$base/$name/output" 2>&1
  echo $? > "$base/$name/status"
}

sample_tree() {
  mkdir -p src/a/b src/c
  seq 1 5000 > src/nums
  printf 'alpha\nbeta\ngamma\n' > src/a/words.txt
  printf 'x%.0s' $(seq 1 3000) > src/a/b/xs.txt
  head -c 100000 /dev/zero | tr '\0' 'q' > src/c/q.bin
  ln -s ../nums src/a/nums.link
  chmod 640 src/a/words.txt
  find src -exec touch -h -d "$STAMP" {} +
}

coreutils() {
  sample_tree
  sort -r src/nums | head -3
  split -l 1000 src/nums part.
  cat part.* | sha256sum
  cp -a src copy
  mv copy/c copy/moved
  ln copy/nums hard
  printf 'one\ntwo\n' | tee teed | wc -l
  dd if=src/nums of=dd.out bs=4096 skip=1 count=2 status=none
  truncate -s 10000 dd.out
  install -m 600 src/a/words.txt installed
  tr a-z A-Z < src/a/words.txt > upper
  sort src/a/words.txt upper | uniq -c
  od -An -tx1 -N16 src/c/q.bin
  base64 src/a/words.txt > b64 && base64 -d b64 > unb64
  cksum src/nums
  du -ab src | sort -k2
  stat -c '%n %s %a %F' src src/a src/a/words.txt src/a/nums.link
  ls -lRn --time-style=+X src | sed 's/  */ /g'
  rm -r part.aa copy/moved
  readlink -f src/a/nums.link | sed "s|$base|BASE|"
  realpath --relative-to=src/a src/c
  df --output=fstype . > /dev/null
}

findutils() {
  sample_tree
  find src -printf '%P %y %s %m\n' | sort
  find src -name '*.txt' -exec wc -c {} + | sort
  find src -type f -newer src/a -o -type f -print | sort
  find src -type f -print0 | sort -z | xargs -0 sha256sum
  find src -name q.bin -delete
  find src | sort
}

diffutils() {
  sample_tree
  cp -a src other
  echo delta >> other/a/words.txt
  rm other/c/q.bin
  echo new > other/new.txt
  { diff -ru src other || [ $? -eq 1 ]; } | sed 's/\t.*//' > changes.diff
  cat changes.diff
  cmp src/a/b/xs.txt other/a/b/xs.txt
  cmp src/a/words.txt other/a/words.txt || [ $? -eq 1 ]
  printf '1\n2\n3\n' > d1; printf '1\n2x\n3\n' > d2; printf '1\n2\n3y\n' > d3
  diff3 d1 d2 d3 || [ $? -eq 1 ]
  diff -q src other || [ $? -eq 1 ]
}

git_repo() {
  export HOME="$PWD" GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=Ada GIT_AUTHOR_EMAIL=ada@example.org
  export GIT_COMMITTER_NAME=Ada GIT_COMMITTER_EMAIL=ada@example.org
  export GIT_AUTHOR_DATE='1700000000 +0000' GIT_COMMITTER_DATE='1700000000 +0000'
  git init -q -b main repo
  cd repo
  git config core.fsync all
  sample_tree
  git add -A
  git commit -q -m 'first'
  echo more >> src/a/words.txt
  git mv src/c src/d
  git commit -q -am 'second'
  git tag -a v1 -m 'version one'
  git checkout -q -b topic
  echo topic > topic.txt
  git add topic.txt
  git commit -q -m 'topic'
  git checkout -q main
  git merge -q --no-ff -m 'merge topic' topic
  git log --stat --format='%H %an %ad %s' --date=raw
  git cat-file -p HEAD
  git status --porcelain
  git diff v1 HEAD --stat
  git fsck --strict 2>&1
  rm -f .git/index  # holds inode numbers and times of this run
}

rsync_copy() {
  sample_tree
  rsync -a src/ mirror/
  echo changed >> src/a/words.txt
  rm src/c/q.bin
  rsync -a --delete --checksum --out-format='%o %n' src/ mirror/ | sort
  rsync -a --inplace src/nums inplace.copy
  rsync -rc --dry-run --out-format='%n' src/ mirror/
}

sqlite() {
  sqlite3 db.sqlite <<'SQL'
PRAGMA journal_mode=WAL;
CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, v REAL);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
INSERT INTO t SELECT i, 'row' || i, i * 0.5 FROM n;
CREATE INDEX t_name ON t(name);
UPDATE t SET v = v * 2 WHERE id % 7 = 0;
DELETE FROM t WHERE id % 11 = 0;
SELECT count(*), sum(v), max(name) FROM t;
PRAGMA wal_checkpoint(TRUNCATE);
PRAGMA journal_mode=DELETE;
BEGIN; INSERT INTO t VALUES (99999, 'late', 1.0); COMMIT;
VACUUM;
PRAGMA integrity_check;
SQL
  sqlite3 db.sqlite .dump | sha256sum
  sqlite3 db.sqlite 'SELECT name FROM t ORDER BY id DESC LIMIT 3'
}

gzip_files() {
  sample_tree
  gzip -n -9 -k src/nums
  gzip -t src/nums.gz
  gzip -l src/nums.gz
  zcat src/nums.gz | cmp - src/nums
  gzip -n -r src/c
  ls src/c
  gunzip -r src/c
  ls src src/c
}

xz_files() {
  sample_tree
  xz -k -T1 -6 src/nums
  xz -t src/nums.xz
  xz -l src/nums.xz
  xz -d -c src/nums.xz | cmp - src/nums
  tar --sort=name --mtime="$STAMP" --owner=0 --group=0 --numeric-owner -cf - -C src a c \
    | xz -T1 > all.tar.xz
  xz -d -k all.tar.xz
}

tar_files() {
  sample_tree
  tar --sort=name --mtime="$STAMP" --owner=0 --group=0 --numeric-owner -cf a.tar src
  tar -tvf a.tar
  mkdir x
  tar -xf a.tar -C x
  diff -r src x/src
  tar --sort=name --mtime="$STAMP" --owner=0 --group=0 --numeric-owner -czf b.tgz src
  tar -tzf b.tgz | sort
}

make_build() {
  mkdir -p in
  for i in 1 2 3 4; do echo "part $i" > in/$i.txt; done
  cat > Makefile <<'MK'
PARTS := $(patsubst in/%.txt,out/%.up,$(wildcard in/*.txt))
all: out/all.txt
out:
	mkdir -p out
out/%.up: in/%.txt | out
	tr a-z A-Z < $< > $@
out/all.txt: $(PARTS)
	cat $^ > $@
clean:
	rm -rf out
.PHONY: all clean
MK
  make -j2 --no-print-directory all | sort
  make --no-print-directory all
  sleep 1.1
  echo 'part 2 changed' > in/2.txt
  make --no-print-directory all
  make --no-print-directory -q all && echo up-to-date
}

compileall_pkg() {
  mkdir -p pkg/sub
  printf 'def f():\n    return 42\n' > pkg/__init__.py
  printf 'from pkg import f\nVALUE = f() * 2\n' > pkg/sub/mod.py
  touch pkg/sub/__init__.py
  "$PY" -m compileall -q --invalidation-mode checked-hash pkg
  find pkg -name '*.pyc' | sort
  "$PY" -B -c 'import pkg.sub.mod as m; print(m.VALUE)'
}

zipfile_py() {
  sample_tree
  "$PY" -m zipfile -c z.zip src
  "$PY" -m zipfile -t z.zip
  "$PY" -m zipfile -l z.zip | sed 's/  */ /g'
  "$PY" -m zipfile -e z.zip out
  diff -r src out/src
}

tarfile_py() {
  sample_tree
  "$PY" -m tarfile -c t.tar src
  "$PY" -m tarfile -l t.tar | sort
  "$PY" -m tarfile -e t.tar out
  diff -r src out/src
}

shutil_py() {
  sample_tree
  "$PY" - <<'PYCODE'
import os, shutil
shutil.copytree("src", "tree", symlinks=True)
shutil.copy2("src/nums", "nums.copy")
shutil.copyfile("src/c/q.bin", "q.copy")
shutil.move("tree/c", "moved")
shutil.make_archive("arch", "tar", ".", "src")
shutil.rmtree("tree/a/b")
with open("nums.copy", "r+b") as f:
    f.seek(10)
    f.write(b"patched")
    f.truncate(5000)
print(sorted(os.listdir(".")), os.path.getsize("arch.tar") > 0)
print(shutil.disk_usage(".").total > 0)
PYCODE
}

section coreutils coreutils
section findutils findutils
section diffutils diffutils
section git git_repo
section rsync rsync_copy
section sqlite3 sqlite
section gzip gzip_files
section xz xz_files
section tar tar_files
section make make_build
section compileall compileall_pkg
section zipfile zipfile_py
section tarfile tarfile_py
section shutil shutil_py
echo '{}'
