# The test suite's last line: its overall result and the counts summed over every test
# binary, from `cargo test` output. Used by contrib/test.sh:
#   awk -v status=EXIT_STATUS -v secs=SECONDS -f contrib/test-summary.awk LOG
/^test result:/ { suites++; p += $4; f += $6; i += $8 }
/^test .* \.\.\. FAILED$/ { sub(/^test /, ""); sub(/ \.\.\. FAILED$/, ""); failed[++nf] = $0 }
END {
  names = ""
  for (k = 1; k <= nf; k++) names = names " " failed[k]
  if (status == 0 && f == 0)
    printf "\nencimg test suite: PASSED: %d passed, %d failed, %d ignored in %d test binaries (%d s)\n", p, f, i, suites, secs
  else if (suites == 0)
    printf "\nencimg test suite: FAILED before any test ran (build error above; exit %d)\n", status
  else
    printf "\nencimg test suite: FAILED: %d passed, %d failed, %d ignored in %d test binaries (%d s); failed:%s\n", p, f, i, suites, secs, names
}
