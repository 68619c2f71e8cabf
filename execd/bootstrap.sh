# Sourced (via BASH_ENV) by every session shell before it reads its first command.
# It defines the daemon's wrapper. Bash reads its command pipe one byte at a time, so the line
# execd/shell.py writes per run is short: a few assignments, then an alias that expands, at top
# level (where `source` must run: in a function, a `declare` in the code would make a local), to
#   pre; [cd DIR &&] [rc PREV ||] source CODE <IN; { st=$?; trap -p ERR; post; } >|FIFO 2>&1
#   e.g.  __execd_s=7;__execd_go0        or   __execd_s=8;__execd_p=130;__execd_go1
# Each function call costs bash ~5-15 us and each redirection ~10 us (measured), so the common
# path has two calls and nothing it can skip (checking the aliases cost ~20 us: a missing alias
# is noticed when its name runs __execd_go0 below instead), and one write to the FIFO when there
# is no ERR trap (one wake-up for the daemon).
# Rules, because the user's shell state persists around them: every function ends with
# `builtin return 0` and reads variables as ${v-} (set -e, set -u); every builtin is called as
# `builtin x` (users define functions named cd, export, printf...); every local is named __execd_*
# (a local named like a user variable would shadow it while the wrapper restores it).
unset BASH_ENV
__execd_dir=$__EXECD_DIR
builtin unset __EXECD_DIR
builtin shopt -s expand_aliases   # aliases work as they do at a prompt
declare -gA __execd_saved_values=() __execd_saved_attrs=()
__execd_seq=
__execd_intr=
__execd_last=
__execd_env_set=
__execd_s= __execd_p=0 __execd_e= __execd_cd= __execd_in=/dev/null   # per-run parameters
__execd_st=0
__execd_user_aliases=1   # the user's expand_aliases, which the wrapper needs on between runs
# The status block's stderr goes to the FIFO too (2>&1 costs a dup, 2>/dev/null an open): under
# `set -x` the trace of its first commands lands before the record, with `trap -p ERR`'s output.
__execd_alias0='\__execd_pre;{ [[ -z $__execd_cd ]]||\builtin cd -- "$__execd_cd";}&&\builtin source "$__execd_dir/code" <"$__execd_in";{ __execd_st=$?;\builtin trap -p ERR;\__execd_post;} >|"$__execd_dir/status" 2>&1'
__execd_alias1='\__execd_pre;{ [[ -z $__execd_cd ]]||\builtin cd -- "$__execd_cd";}&&{ \__execd_rc "$__execd_p"||\builtin source "$__execd_dir/code" <"$__execd_in";};{ __execd_st=$?;\builtin trap -p ERR;\__execd_post;} >|"$__execd_dir/status" 2>&1'

__execd_user_debug=
__execd_user_extdebug=
__execd_trap=

# Hands a status back as $? so the user's code starts with the previous run's $?.
__execd_rc() { builtin return "$1"; }

# Per-run env: remember the old value, export flag and unset-ness, then export the new value.
__execd_setenv() {
  if [[ -v $1 ]]; then
    # Assigning a read-only variable would end a non-interactive shell: leave such a name alone.
    if [[ ${!1@a} == *r* ]]; then builtin return 0; fi
    __execd_saved_values[$1]=${!1}
    __execd_saved_attrs[$1]="set:${!1@a}"
  else
    __execd_saved_attrs[$1]=unset
  fi
  builtin export -- "$1=$2"
  __execd_env_set=1
  builtin return 0
}

__execd_restore_env() {
  builtin local __execd_name __execd_attrs
  for __execd_name in "${!__execd_saved_attrs[@]}"; do
    __execd_attrs=${__execd_saved_attrs[$__execd_name]}
    if [[ $__execd_attrs == unset ]]; then
      builtin unset -v -- "$__execd_name" || builtin :
    else
      builtin export -n -- "$__execd_name" || builtin :
      builtin printf -v "$__execd_name" '%s' "${__execd_saved_values[$__execd_name]}" || builtin :
      if [[ $__execd_attrs == *x* ]]; then builtin export -- "$__execd_name" || builtin :; fi
    fi
  done
  __execd_saved_values=()
  __execd_saved_attrs=()
  __execd_env_set=
  builtin return 0
}

# The daemon writes "SEQ SIGNAL" to $__execd_dir/interrupt, then sends SIGUSR2. The interrupt only
# counts for the run it names, so a late signal never stops the next run.
__execd_check_interrupt() {
  { builtin local __execd_xtrace=$-; builtin set +x; } 2>/dev/null
  __execd_check_interrupt_untraced
  if [[ $__execd_xtrace == *x* ]]; then builtin set -x; fi
  builtin return 0
}

__execd_check_interrupt_untraced() {
  builtin local IFS=$' \t\n' __execd_iseq __execd_isig
  { builtin read -r __execd_iseq __execd_isig <"$__execd_dir/interrupt"; } 2>/dev/null || builtin return 0
  if [[ -z $__execd_seq || $__execd_iseq != "$__execd_seq" || -n $__execd_intr ]]; then builtin return 0; fi
  __execd_intr=$__execd_isig
  if [[ $__execd_isig == INT ]]; then __execd_run_user_int_trap; fi
  # From here on every command of the user's code returns at once (extdebug: DEBUG status 2 = return).
  __execd_trap_text DEBUG
  __execd_user_debug=$__execd_trap
  if builtin shopt -q extdebug; then __execd_user_extdebug=1; else __execd_user_extdebug=; fi
  builtin shopt -s extdebug
  builtin trap '{ \__execd_unwind; } 2>/dev/null' DEBUG
  builtin return 0
}

__execd_run_user_int_trap() {
  __execd_trap_text INT
  [[ -n $__execd_trap ]] || builtin return 0
  builtin eval "builtin set -- $__execd_trap"
  # In POSIX mode an unset trap prints as `trap -- - SIGINT`; the wrapper's own does nothing.
  if [[ -n ${3-} && $3 != - && $3 != "$__execd_sigint_trap" ]]; then builtin eval "$3"; fi
  builtin return 0
}

# What `trap -p SIGNAL` prints, in __execd_trap, through the private FIFO "scratch" (written, then
# read back on one fd). Not by command substitution: its subshell would count among the run's
# processes, the interrupt's SIGINT could kill it, and the child would run the pending traps. Not
# through a regular file: `ulimit -f 0` would end the shell (SIGXFSZ).
__execd_trap_text() {
  builtin local __execd_fd
  __execd_trap=
  { builtin exec {__execd_fd}<>"$__execd_dir/scratch"; } 2>/dev/null || builtin return 0
  { builtin trap -p "$1"; builtin printf '\0'; } >&"$__execd_fd"
  IFS= builtin read -r -d '' __execd_trap <&"$__execd_fd"
  builtin exec {__execd_fd}>&-
  __execd_trap=${__execd_trap%$'\n'}
  builtin return 0
}

__execd_unwind() {
  if [[ -n $__execd_intr ]] && (( ${#FUNCNAME[@]} > 1 )) && [[ ${FUNCNAME[1]} != __execd_* ]]; then
    builtin return 2
  fi
  builtin return 0
}

__execd_clear_interrupt() {
  [[ -n $__execd_intr ]] || builtin return 0
  __execd_intr=
  builtin trap - DEBUG
  if [[ -n $__execd_user_debug ]]; then builtin eval "$__execd_user_debug"; fi
  if [[ -z $__execd_user_extdebug ]]; then builtin shopt -u extdebug; fi
  builtin return 0
}

# pre and post run for every run, and test once for everything rare (a per-run env, an interrupt,
# alias expansion switched off, an ERR trap's status), which they leave to functions of their own.
__execd_pre() {
  if [[ -n $__execd_intr$__execd_e || -z $__execd_user_aliases ]]; then __execd_pre_rare; fi
  __execd_seq=$__execd_s
  if [[ -e $__execd_dir/interrupt ]]; then __execd_check_interrupt; fi
  builtin return 0
}

__execd_pre_rare() {
  if [[ -n $__execd_intr ]]; then __execd_clear_interrupt; fi
  if [[ -z $__execd_user_aliases ]]; then builtin shopt -u expand_aliases; fi
  if [[ -n $__execd_e ]]; then builtin source "$__execd_dir/prelude"; fi
  builtin return 0
}

# Reports SEQ, STATUS (the code's $?, saved in __execd_st), FLAGS and PWD, each after a NUL, on
# stdout, which the run's line sends to the private FIFO that only the daemon reads, after the
# output of `trap -p ERR` (at top level: a function does not see the ERR trap). With an ERR trap,
# or under `set -e`, the code file ends by saving $? in __execd_last, so that `source` itself
# returns 0: the trap does not fire twice, and errexit does not end the shell.
__execd_post() {
  builtin local __execd_flags=$-
  if [[ $__execd_flags == *[xv]* ]]; then builtin set +xv; fi
  # No run is on from here: an interrupt signal that arrives late must not arm the next run.
  __execd_seq=
  if [[ -n $__execd_last$__execd_env_set$__execd_intr || -z $__execd_user_aliases ]]; then __execd_post_rare; fi
  __execd_e= __execd_cd= __execd_in=/dev/null
  builtin printf '\0%s\0%s\0%s\0%s\0' "$__execd_s" "$__execd_st" "$__execd_flags" "$PWD"
  builtin return 0
}

__execd_post_rare() {
  if [[ -n $__execd_last && $__execd_st == 0 ]]; then __execd_st=$__execd_last; fi
  __execd_last=
  if [[ -n $__execd_env_set ]]; then __execd_restore_env; fi
  if [[ -n $__execd_intr ]]; then __execd_clear_interrupt; fi
  if [[ -z $__execd_user_aliases ]]; then
    # The user's code may have switched alias expansion back on; the next line needs it on.
    if builtin shopt -q expand_aliases; then __execd_user_aliases=1; else builtin shopt -s expand_aliases; fi
  fi
  builtin return 0
}

# The line's alias did not expand: the user's code removed the aliases, or switched alias
# expansion off. Then the name is found as this function, which puts both back (remembering the
# user's setting, which pre hands back to their code) and asks the daemon to send the line again.
__execd_go0() { __execd_realias; }
__execd_go1() { __execd_realias; }
__execd_realias() {
  # Expansion off here means the user's last run switched it off (post turns it back on for a
  # user who had it off already, whose setting stays recorded).
  if ! builtin shopt -q expand_aliases; then
    __execd_user_aliases=
    builtin shopt -s expand_aliases
  fi
  builtin alias __execd_go0="$__execd_alias0" __execd_go1="$__execd_alias1"
  builtin printf '\0%s\0again\0\0\0' "$__execd_s" >|"$__execd_dir/status"
  builtin return 0
}

# bash sends itself SIGINT when a command substitution's process dies of SIGINT, so an interrupt
# of `x=$(sleep 100)` would end a non-interactive shell. With a trap on SIGINT it lives on, as an
# interactive shell does; the interrupt itself is the USR2 trap's work. (Programs the shell starts
# get SIGINT's default action back, as with any trap.)
__execd_sigint_trap='\__execd_sigint'
__execd_sigint() { builtin return 0; }
builtin trap "$__execd_sigint_trap" INT

# The trap's own call is traced under `set -x`: it goes to /dev/null, while the handler (which may
# run the user's INT trap) gets the real stderr back through fd 19.
builtin trap '{ \__execd_check_interrupt 2>&19 19>&-; } 19>&2 2>/dev/null' USR2
builtin alias __execd_go0="$__execd_alias0" __execd_go1="$__execd_alias1"
if [[ -n ${__EXECD_NOFILE-} ]]; then builtin ulimit -Sn "$__EXECD_NOFILE" 2>/dev/null; fi
# --max-processes: soft and hard, so the session's code cannot raise it again.
if [[ -n ${__EXECD_NPROC-} ]]; then builtin ulimit -u "$__EXECD_NPROC" 2>/dev/null; fi
builtin cd -- "$__EXECD_CWD" || builtin exit 97
builtin unset __EXECD_CWD __EXECD_NOFILE __EXECD_NPROC
builtin printf '\0%s\0%s\0%s\0%s\0' ready 0 "$-" "$PWD" >|"$__execd_dir/status"
